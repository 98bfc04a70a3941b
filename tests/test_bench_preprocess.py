"""bench.preprocess end to end on a slice of the real samples: its JSON and the id check.

3,000 cc100 lines and 60 JaWiki articles from ../shared/corpora, recompressed in their formats,
go through the documented command with 2 workers. About 20 s on 2 cores (transformers and
datasets imports included); the timings it reports are not checked, only that they are there.
"""

from __future__ import annotations

import gzip
import itertools
import json
import lzma
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_writes_its_report_and_both_paths_agree(tmp_path, web_sample, wiki_sample):
    with lzma.open(web_sample, "rb") as handle:
        web_lines = list(itertools.islice(handle, 3000))
    web = tmp_path / "web.txt.xz"
    web.write_bytes(lzma.compress(b"".join(web_lines), preset=1))
    with gzip.open(wiki_sample, "rb") as handle:
        wiki_lines = list(itertools.islice(handle, 2 * 60))
    wiki = tmp_path / "wiki.json.gz"
    wiki.write_bytes(gzip.compress(b"".join(wiki_lines), compresslevel=1))

    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "bench.preprocess", "--web", str(web), "--wiki", str(wiki),
                    "--json", str(out), "--workers", "2"], cwd=REPO_ROOT, check=True,
                   capture_output=True, timeout=300)
    report = json.loads(out.read_text(encoding="utf-8"))

    assert report["workers"] == 2
    assert report["ids_identical"] is True
    check = report["ids_check"]
    assert check["mismatched_rows"] == 0 and check["compared_rows"] > 4000
    assert check["compared_fraction_of_ours"] > 0.95
    non_empty = sum(1 for line in web_lines if line.strip())
    for path in ("ours", "baseline"):
        result = report[path]
        assert result["lines_cc100_input"] == non_empty
        assert result["lines"] == result["lines_cc100_input"] + result["lines_jawiki_sentences"]
        assert result["lines_per_s"] > 0 and result["peak_rss_mb"] > 0
        stages = {"cc100_corpus", "jawiki_corpus", "cc100_tokens", "jawiki_tokens"}
        assert stages <= set(result["stages_seconds"])
        assert result["lines_per_s_per_worker"] == round(result["lines_per_s"] / 2)
        assert result["chars"] > 50 * result["lines"]  # Aozora-style lines and JaWiki sentences
        assert 0 < result["fraction_of_limit"]["lines"] < 2 and 0 < result["fraction_of_limit"]["chars"] < 2
    # Ours runs the independent steps concurrently, as Dagster's executor does.
    assert {"corpora_wall", "tokens_wall"} <= set(report["ours"]["stages_seconds"])
    limit = report["limit"]
    assert limit["sample_lines"] > 3000 and limit["mecab_lines_per_s_per_core"] > 0
    assert limit["mecab_chars_per_s_per_core"] > 20 * limit["mecab_lines_per_s_per_core"]
    assert report["speedup"] == round(report["ours"]["lines_per_s"]
                                      / report["baseline"]["lines_per_s"], 2)
    # Sentence splitting differs (the original's splitter ignores brackets); cc100 lines do not.
    assert abs(report["ours"]["lines_jawiki_sentences"]
               - report["baseline"]["lines_jawiki_sentences"]) < 0.05 * report["ours"]["lines"]
