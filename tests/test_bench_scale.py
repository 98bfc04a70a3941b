"""bench.scale: the synthetic corpus generator (bench/scale_data.py), the extrapolation, and one run end to end.

The generator recombines the real samples in ../shared/corpora; its files must read back as the pipeline reads
them, repeat < 1% of lines, keep the source's mean length and character mix within 10%, and be the same text for
the same seed. The end-to-end run (slow, 45 s on 2 cores) materialises the first three assets at two sizes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `bench` is a folder of the repository, not an installed package

from bench.scale import STEPS, extrapolate, growth
from bench.scale_data import CHAR_CLASSES, load_source, profile_lines, synthetic_pair
from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus


@pytest.fixture(scope="module")
def source(web_sample, wiki_sample):
    """The shared samples cut into clauses once (~4 s)."""
    return load_source(web_sample, wiki_sample)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, web_sample, wiki_sample, source):
    """20,000 cc100 lines and 6,000 JaWiki sentences, seed 7."""
    return synthetic_pair(web_sample, wiki_sample, 20_000, 7, tmp_path_factory.mktemp("pair"), lambda: source)


def _text_sha(path: Path) -> str:
    opener = lzma.open if path.suffix == ".xz" else gzip.open
    with opener(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_profile_counts_repeats_and_character_classes():
    profile = profile_lines(["あア亜a1。", "あア亜a1。", "ＡＢ２"])
    assert profile["lines"] == 3 and profile["chars"] == 15 and profile["mean_chars"] == 5.0
    assert profile["repeated_line_fraction"] == round(1 / 3, 5)
    assert profile["char_mix"] == {"hiragana": 0.1333, "katakana": 0.1333, "kanji": 0.1333, "latin": 0.2667,
                                   "digit": 0.2, "other": 0.1333}


def test_same_seed_same_text_other_seed_other_text(tmp_path, web_sample, wiki_sample, source):
    made = {name: synthetic_pair(web_sample, wiki_sample, 3000, seed, tmp_path / name, lambda: source)
            for name, seed in (("a", 1), ("b", 1), ("c", 2))}
    for kind in ("web", "wiki"):
        digests = {name: _text_sha(getattr(p, kind)) for name, p in made.items()}
        assert digests["a"] == digests["b"] != digests["c"]
    again = synthetic_pair(web_sample, wiki_sample, 3000, 1, tmp_path / "a", lambda: pytest.fail("not cached"))
    assert again.generate_seconds == 0 and again.web == made["a"].web and again.profiles == made["a"].profiles


def test_lines_rarely_repeat_and_keep_the_source_length_and_character_mix(pair):
    for corpus in ("cc100", "jawiki"):
        source, synthetic = pair.profiles["source"][corpus], pair.profiles["synthetic"][corpus]
        assert synthetic["repeated_line_fraction"] < 0.01, corpus
        assert abs(synthetic["mean_chars"] / source["mean_chars"] - 1) < 0.10, corpus
        for name in CHAR_CLASSES:
            if source["char_mix"][name] >= 0.01:
                assert abs(synthetic["char_mix"][name] / source["char_mix"][name] - 1) < 0.10, (corpus, name)
    assert pair.profiles["synthetic"]["cc100"]["lines"] == pair.cc100_lines == 20_000
    # 0.3 JaWiki sentences per cc100 line, as split again from the article text.
    assert abs(pair.profiles["synthetic"]["jawiki"]["lines"] - 6000) <= 12


def test_the_pipeline_reads_both_files_as_generated(tmp_path, pair):
    wiki = build_jawiki_corpus(pair.wiki, tmp_path / "w.train", tmp_path / "w.val", JawikiSettings(), workers=1)
    assert wiki.documents_read == pair.jawiki_articles and not wiki.skipped
    kept = wiki.lines_train + wiki.lines_validation
    assert kept >= 0.99 * pair.jawiki_sentences  # JaWiki dedup leaves them (a source sentence would not survive)
    assert wiki.dropped.get("sentences_duplicate", 0) < 0.01 * kept
    settings = Cc100Settings(max_lines=10**6, max_validation_lines=5000, validation_doc_fraction=0.1)
    cc100 = build_cc100_corpus(pair.web, tmp_path / "c.train", tmp_path / "c.val", settings, workers=1)
    assert cc100.lines_read == pair.cc100_lines and cc100.documents_read == pair.cc100_documents
    assert not cc100.skipped


def test_generator_memory_does_not_grow_with_the_size(tmp_path, web_sample, wiki_sample):
    """Peak RSS (VmHWM, of a child process, reset once the source is loaded) after 5,000 and then 100,000 lines.

    Loading the source peaks higher than generating, hence the reset. Holding the 100k lines would add ~21 MB.
    """
    script = f"""
import re, sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from pathlib import Path
from bench.scale_data import Uniform, load_source, write_cc100, write_jawiki
def peak_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
source = load_source(Path({str(web_sample)!r}), Path({str(wiki_sample)!r}))
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
peaks = []
for lines in (5000, 100000):
    write_cc100(Path({str(tmp_path)!r}) / f"{{lines}}.txt.xz", source, lines, Uniform(lines))
    write_jawiki(Path({str(tmp_path)!r}) / f"{{lines}}.json.gz", source, lines // 3, Uniform(lines))
    peaks.append(peak_kib())
print(peaks[0], peaks[1])
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300)
    small_kib, large_kib = map(int, out.stdout.split())
    assert large_kib - small_kib < 8 * 1024, (small_kib, large_kib)


def _run(lines: int, step_seconds: float, main_rss: float, worker_rss: float, disk: float) -> dict:
    record = {"seconds": step_seconds + 10, "step_seconds": step_seconds, "checks_seconds": 0.0,
              "cpu_seconds": {"main": step_seconds / 3}, "main_busiest_thread_cpu_seconds": step_seconds / 4,
              "peak_rss_mb": main_rss + 2 * worker_rss,
              "peak_cli_rss_mb": 100.0, "peak_main_rss_mb": main_rss, "peak_worker_rss_mb": worker_rss, "workers": 2,
              "disk_mb": disk, "peak_disk_mb": 2 * disk}
    return {"cc100_lines": lines, "units": {"cc100_lines": lines}, "assets": {"cc100_ja_corpus": record}}


def test_extrapolation_is_linear_from_the_two_largest_sizes():
    runs = [_run(1000, 0.1, 500, 90, 1), _run(1_000_000, 100.0, 501, 90, 100), _run(2_000_000, 200.0, 502, 91, 200)]
    targets = {"cc100_lines": 128_000_000, "jawiki_sentences": 40_000_000, "sample_sentences": 10_000_000}
    result = extrapolate(runs, workers=2, targets=targets)
    corpus = result["assets"]["cc100_ja_corpus"]
    assert corpus["seconds_on_measured_workers"] == 12_810  # 200 s + 100 s a million lines for 126M more, + start-up
    assert corpus["serial_seconds"] == 3200 and corpus["seconds"] == 3200  # 12,810 × 2/16 = 1,601 is below it
    assert corpus["peak_rss_mb"] == 100 + 502 + 16 * 91  # under 5% of growth: flat, one per core
    assert corpus["disk_mb"] == 12_800 and corpus["peak_disk_mb"] == 25_600
    assert result["disk_gb"] == 12.5 and result["peak_disk_gb"] == 25.0 and result["seconds"] == 3200
    assert result["from_sizes"] == [1_000_000, 2_000_000]
    assert growth(runs, "step_seconds", per_line=True) == {"cc100_ja_corpus": 1.0, "max": 1.0}
    assert result["training_seconds"] is None  # no --gpu-tokens-per-s


def test_training_time_is_the_full_size_token_count_over_the_given_rate():
    runs = [_run(1_000_000, 100.0, 500, 90, 100), _run(2_000_000, 200.0, 500, 90, 200)]
    for run in runs:
        run["assets"]["bert_stage1_cc100"] = dict(run["assets"]["cc100_ja_corpus"])
        tokens = {"train.num_tokens": 80 * run["cc100_lines"]}
        run["assets"]["cc100_ja_tokens"] = {**run["assets"]["cc100_ja_corpus"], "metadata": {"cc100_ja_tokens": tokens}}
    targets = {"cc100_lines": 128_000_000, "jawiki_sentences": 40_000_000, "sample_sentences": 10_000_000}
    result = extrapolate(runs, workers=2, targets=targets, gpu_tokens_per_s=2_000_000)
    assert result["training"] == {"bert_stage1_cc100": {"tokens": 80 * 128_000_000, "seconds": 5120}}
    assert result["training_seconds"] == 5120 and result["assets"]["bert_stage1_cc100"]["seconds"] is None


@pytest.mark.slow
def test_bench_runs_the_first_assets_at_two_sizes(tmp_path, web_sample, wiki_sample):
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, "-m", "bench.scale", "--web", str(web_sample), "--wiki", str(wiki_sample),
                    "--sizes", "2000,4000", "--workers", "2", "--through", "cc100_ja_corpus", "--executor",
                    "in_process", "--work", str(tmp_path / "work"), "--json", str(out)],
                   cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text(encoding="utf-8"))
    names = [step.name for step in STEPS[:3]]
    assert [run["cc100_lines"] for run in report["runs"]] == [2000, 4000]
    for run in report["runs"]:
        assert list(run["assets"]) == names and abs(run["jawiki_sentences"] - 0.3 * run["cc100_lines"]) <= 20
        corpus = run["assets"]["cc100_ja_corpus"]
        assert corpus["metadata"]["cc100_ja_train"]["lines_read"] == run["cc100_lines"] == corpus["lines"]
        assert corpus["workers"] >= 1 and corpus["peak_worker_rss_mb"] > 0 and corpus["checks_seconds"] > 0
        assert corpus["disk_mb"] > 0 and corpus["cpu_seconds"]["worker"] > 0
        for record in run["assets"].values():
            assert record["seconds"] > record["step_seconds"] > 0 and record["peak_rss_mb"] > 0
            assert record["lines_per_s"] > 0 and record["chars_per_s"] > 20 * record["lines_per_s"]
    assert set(report["rss_growth"]) == {*names, "max"}
    assert report["limit"]["mecab_lines_per_s_per_core"] > 0 and report["limit"]["sample_lines"] > 3000
    assert report["ours_lines_per_s_per_worker"] is None  # JaWiki and token steps did not run
    assert set(report["extrapolation"]["assets"]) == set(names)
    assert report["synthetic"]["4000"]["cc100"]["lines"] == 4000 and "source" in report["synthetic"]
