from experiments.report import table


def test_table_marks_lengths_a_scheme_cannot_run():
    results = [
        {"name": "learned", "rows": [{"scaling": "trained (none)", "length": 512, "loss": 2.0, "beyond_loss": None},
                                     {"scaling": "trained (none)", "length": 1024, "error": "cannot represent"}]},
        {"name": "rope", "rows": [{"scaling": "yarn", "length": 512, "loss": 2.1, "beyond_loss": None},
                                  {"scaling": "yarn", "length": 1024, "loss": 2.5, "beyond_loss": 2.7}]},
    ]
    md, notes = table(results)
    assert "| learned | trained (none) | 2.000 | - |" in md and "| rope | yarn | 2.100 | 2.500 |" in md
    assert notes == ["learned @ 1024: cannot represent"]
    md, _ = table(results, "beyond_loss")
    assert "| rope | yarn | - | 2.700 |" in md


def test_retrieval_sections_table_and_heatmaps(tmp_path):
    import json

    from experiments.report import retrieval_sections

    def grid(acc):
        cells = [{"length": L, "depth": d, "accuracy": acc(L, d), "token_accuracy": 1.0} for L in (256, 512)
                 for d in (0.0, 1.0)]
        return {"task": "passkey", "step": 9, "train_len": 256, "position": "rope", "lengths": [256, 512],
                "rows_axis": "depth", "rows": [0.0, 1.0], "cells": cells, "protocol": "teacher-forced; x"}

    for name, acc in (("alibi", lambda L, d: 1.0 if d else 0.5), ("rope", lambda L, d: 1.0 if L == 256 else 0.0)):
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "results.json").write_text(json.dumps({"extrapolation": {}, "passkey": grid(acc)}))
    out = tmp_path / "out"
    out.mkdir()
    md = "\n".join(retrieval_sections(tmp_path, out))
    assert "| alibi | 0% | 0.50 | 0.50 |" in md and "| rope | 100% | 1.00 | 0.00 |" in md
    assert "![passkey](passkey_heatmaps.png)" in md and (out / "passkey_heatmaps.png").stat().st_size > 1000


def test_training_section_tables_validation_rows_and_plots_curves(tmp_path):
    import json

    from experiments.report import training_section

    for name, acc in (("a", 0.25), ("b", 1.0)):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "split": "train", "loss": 2.0 / s} for s in (1, 2, 3)]
        rows.append({"step": 3, "split": "validation", "loss": 0.5, "text_loss": 1.5, "retrieval_acc": acc})
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    md = "\n".join(training_section(tmp_path, out))
    assert "| run | step | loss | text loss | retrieval accuracy |" in md
    assert "| a | 3 | 0.500 | 1.500 | 0.250 |" in md and "| b | 3 | 0.500 | 1.500 | 1.000 |" in md
    assert (out / "training_curves.png").stat().st_size > 1000
    (tmp_path / "a" / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n")
    (tmp_path / "b" / "metrics.jsonl").unlink()
    assert training_section(tmp_path, out) == []  # no validation rows: no section


def test_kv_cache_section_keeps_small_caches_visible(tmp_path):
    import json

    from experiments.report import kv_cache_section

    for name, b in (("global", 3072.0), ("sliding", 0.375)):
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "summary.json").write_text(json.dumps(
            {"kv_cache": {"context": 131072, "bytes_per_token": b, "describe": name}}))
    md = "\n".join(kv_cache_section(tmp_path))
    assert "| global | 3,072 | global |" in md and "| sliding | 0.375 | sliding |" in md  # not rounded to 0
