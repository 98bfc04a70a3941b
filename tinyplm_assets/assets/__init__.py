"""The asset graph, one module per stage: sources → corpora → tokenizer → tokens → models."""
