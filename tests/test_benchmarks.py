"""The GPU benchmarks' CPU path, at toy sizes, so they cannot rot. Nothing here asserts a speed."""
import gzip
import json

from benchmarks import quality
from conftest import GPT2_DIR, SHARED_DATA


def test_quality_benchmark_produces_table_and_curves(tmp_path, capsys):
    books = tmp_path / "books"
    books.mkdir()
    for src, dst, n in (("train-00.txt.gz", "train.txt", 60_000), ("valid.txt.gz", "valid.txt", 20_000)):
        with gzip.open(SHARED_DATA / "gutenberg" / src, "rt", encoding="utf-8") as f:
            (books / dst).write_text(f.read(n))
    out = tmp_path / "out"
    quality.main(["--data", str(books), "--gpt2", str(GPT2_DIR), "--models", "StoryLlama", "SmolMixtral", "--tiny",
                  "--tokens", "1024", "--tokens_per_step", "256", "--evals", "2", "--eval_batches", "2",
                  "--bpe_vocab", "300", "--num_proc", "1", "--sample_tokens", "8", "--device", "cpu",
                  "--out", str(out)])
    table = capsys.readouterr().out
    assert "HF LlamaForCausalLM" in table and "HF MixtralForCausalLM" in table
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results] == ["StoryLlama", "SmolMixtral"]
    assert len(results[0]["runs"]) == 3  # two seeds of ours (the noise estimate) and the reference
    for r in results:  # three samples from each trained model, for the same prompts
        assert [s["prompt"] for s in r["runs"][0]["samples"]] == quality.SAMPLE_PROMPTS
    for name in ("StoryLlama", "SmolMixtral"):
        assert (out / f"quality_{name}.png").stat().st_size > 1000
