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
