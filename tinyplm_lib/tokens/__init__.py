"""Tokens: the MeCab + WordPiece tokenizer, the fast encoder and the packed uint16 token shards.

A tokenizer folder loads in Hugging Face as `BertJapaneseTokenizer`; the encoder gives the same ids
several times faster, and shards are written resumably with a meta file beside them.
"""
