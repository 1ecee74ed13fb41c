"""`vlp eval bias` end to end on a tiny model, probe-file checks and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vlpretrain.evaluation.bias import load_probe, run_bias_probe
from vlpretrain.models import load_model

from helpers import vlp

GROUPS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _table(root: Path, per_group: int = 6) -> Path:
    """A CSV of small images with a ``group`` column (the colour) and a ``kind`` label column."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = ["image,group,kind"]
    for name, rgb in GROUPS.items():
        for i in range(per_group):
            noise = rng.integers(-20, 20, (16, 16, 3))
            Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype("uint8")).save(root / "images" / f"{name}{i}.png")
            lines.append(f"images/{name}{i}.png,{name},{'square' if i % 2 else 'circle'}")
    (root / "people.csv").write_text("\n".join(lines) + "\n")
    return root / "people.csv"


def _probe(root: Path, **overrides) -> Path:
    probe = {
        "name": "colours",
        "data": "people.csv",
        "group_column": "group",
        "templates": ["a photo of {}.", "an image of {}."],
        "permutations": 500, "bootstrap": 50, "controls": 20,
        "association": [{"name": "crime", "sensitive": ["a criminal"], "neutral": ["a person"]}],
        "harmful_labels": {"neutral": ["a person", "a cook"], "sensitive": ["a criminal"]},
        "group_performance": {"label_column": "kind"},
        "retrieval_skew": {"k": [5, 3], "queries": {"crime": ["a criminal"], "neutral": ["a person", "a cook"]}},
    }
    probe.update(overrides)
    path = root / "probe.yaml"
    path.write_text(yaml.safe_dump(probe))
    return path


@pytest.mark.slow
def test_vlp_eval_bias_writes_report_summary_and_plot(tmp_path, checkpoint):
    _table(tmp_path)
    out = tmp_path / "out"
    proc = vlp("eval", "bias", "--model", str(checkpoint), "--probe", str(_probe(tmp_path)), "--out", str(out),
               "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bias probe colours on people: 18 images, groups blue 6, green 6, red 6" in proc.stdout
    def strict(constant):
        raise AssertionError(f"report.json holds {constant}, which is not JSON")

    report = json.loads((out / "report.json").read_text(), parse_constant=strict)
    assert set(report) >= {"dataset", "model", "pretrained", "task", "metrics", "language"} and report["task"] == "bias"
    m = report["metrics"]
    assert m["groups"] == ["blue", "green", "red"] and m["images"] == 18
    crime = m["association"]["crime"]["groups"]["red"]
    assert {"effect_size", "effect_size_ci", "p_value", "p_adjusted", "control_p_value"} <= set(crime)
    assert set(m["harmful_labels"]["groups"]["red"]) >= {"rate", "rate_ci", "disparity", "p_adjusted", "control_p_value"}
    assert m["group_performance"]["classes"] == 2 and len(m["group_performance"]["gap_ci"]) == 2
    skew = m["retrieval_skew"]["crime"]
    assert set(skew) == {"queries", "k=5", "k=3"} and len(skew["k=5"]["max_skew_ci"]) == 2
    assert "control_p_value" in skew["k=5"]["groups"]["red"]  # the headline k (the first) has the control test
    sensitivity = m["prompt_sensitivity"]
    assert set(sensitivity) == {"association/crime/effect_size", "harmful_labels/rate", "group_performance/accuracy",
                                "retrieval_skew/crime/skew@5", "retrieval_skew/neutral/skew@5"}
    assert set(sensitivity["harmful_labels/rate"]["per_template"]) == {"a photo of {}.", "an image of {}."}
    summary = (out / "summary.md").read_text()
    assert "## Association: crime" in summary and "| red |" in summary and "## Prompt sensitivity" in summary
    assert (out / "report.png").stat().st_size > 5000


@pytest.mark.slow
def test_python_api_is_deterministic_and_flags_follow_the_rule(tmp_path, checkpoint):
    _table(tmp_path)
    model = load_model(checkpoint)
    first = run_bias_probe(model, _probe(tmp_path), progress=False)
    second = run_bias_probe(model, load_probe(_probe(tmp_path)), progress=False)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    m = first["metrics"]
    for flag in m["flags"]:
        assert flag["p_adjusted"] < m["alpha"] and (flag.get("control_p_value") is None or flag["control_p_value"] < m["alpha"])


def test_vocabulary_control_words_are_single_whole_words():
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    from vlpretrain.evaluation.bias.control_words import vocabulary_words
    from vlpretrain.models.towers import resolve_hf_name

    bpe = open_clip.get_tokenizer("ViT-B-32")
    wordpiece = HFTokenizer(resolve_hf_name("minilm-l6"), context_length=16)
    for tokenizer in (bpe, wordpiece):
        words = vocabulary_words(tokenizer, 200, seed=3, exclude=["a criminal", "a police officer"])
        assert len(set(words)) == 200 and words == vocabulary_words(tokenizer, 200, seed=3,
                                                                    exclude=["a criminal", "a police officer"])
        assert words != vocabulary_words(tokenizer, 200, seed=4)
        for text in words:
            article, word = text.split(" ")
            assert article == ("an" if word[0] in "aeiou" else "a")
            assert word.isalpha() and word.islower() and len(word) >= 5 and word not in {"criminal", "police", "officer"}
            # start token, article, the word, end token: each control word is one token, as "criminal" is
            assert int((tokenizer([text])[0] != 0).sum()) == 4, text

    class NoVocabulary:
        pass

    with pytest.raises(ValueError, match=r"^control_words: vocabulary needs a tokenizer with a vocabulary; "
                                         r"NoVocabulary exposes none \(use control_words: pseudo\)$"):
        vocabulary_words(NoVocabulary(), 5)


@pytest.mark.slow
def test_vocabulary_controls_are_reported(tmp_path, checkpoint, monkeypatch):
    from vlpretrain.evaluation.bias import control_words as control_module

    _table(tmp_path)
    model = load_model(checkpoint)
    pseudo = run_bias_probe(model, _probe(tmp_path), progress=False)["metrics"]
    calls = []
    real = control_module.vocabulary_words
    monkeypatch.setattr(control_module, "vocabulary_words",
                        lambda tokenizer, count, seed, exclude: calls.append((tokenizer, count, exclude))
                        or real(tokenizer, count, seed, exclude))
    monkeypatch.setattr(control_module, "pseudo_words", lambda *a: pytest.fail("pseudo-words drawn"))
    vocabulary = run_bias_probe(model, _probe(tmp_path, control_words="vocabulary"), progress=False)["metrics"]
    assert pseudo["control_words"] == "pseudo" and vocabulary["control_words"] == "vocabulary"
    # The pool: the model's own tokenizer, 50 more words than draws, none of the probe's words.
    assert len(calls) == 1 and calls[0][0] is model.tokenizer and calls[0][1] == 20 + 50
    assert {"a criminal", "a person", "a cook"} <= set(calls[0][2])
    red = lambda m: m["association"]["crime"]["groups"]["red"]  # noqa: E731
    assert red(pseudo)["effect_size"] == red(vocabulary)["effect_size"]  # only the control changes
    from vlpretrain.evaluation.bias import write_bias_report

    paths = write_bias_report({"metrics": vocabulary, "model": "tiny", "dataset": "people", "probe": "colours"},
                              tmp_path / "out")
    assert "20 vocabulary-word control draws" in Path(paths["markdown"]).read_text()


def test_class_folders_are_groups_and_where_filters(tmp_path, checkpoint):
    _table(tmp_path)
    probe = _probe(tmp_path, where={"kind": "square"}, group_performance=None)
    report = run_bias_probe(load_model(checkpoint), probe, progress=False)
    assert report["metrics"]["images"] == 9 and report["metrics"]["left_out"]["where kind"] == 9
    folders = tmp_path / "folders"
    for name in GROUPS:
        (folders / name).mkdir(parents=True)
        for image in sorted((tmp_path / "images").glob(f"{name}*.png"))[:3]:
            (folders / name / image.name).write_bytes(image.read_bytes())
    probe = _probe(tmp_path, data="folders", group_column="label", group_performance=None)
    report = run_bias_probe(load_model(checkpoint), probe, progress=False)
    assert report["metrics"]["group_sizes"] == {"blue": 3, "green": 3, "red": 3}


@pytest.mark.parametrize("overrides, message", [
    ({"colour": 1}, "unknown keys ['colour']"),
    ({"groups": ["red", "purple"]}, "group 'purple' has no images (groups found: ['blue', 'green', 'red']); a group "
                                    "needs at least 2; fix 'groups' or 'where'"),
    ({"where": {"kind": "square"}, "groups": ["red", "blue"], "data": "one_red.csv"},
     "group 'red' has one image (groups found: ['blue', 'red']); a group needs at least 2"),
    ({"permutations": 0}, "'permutations' must be an integer of at least 1, got 0"),
    ({"control_words": "random"}, "'control_words' must be one of ['pseudo', 'vocabulary'], got 'random'"),
    ({"where": {"shape": "round"}}, "'where' names column 'shape', which the data does not have (columns: ['kind'])"),
    ({"association": None, "harmful_labels": None, "group_performance": None, "retrieval_skew": None},
     "no probe to run; add one of association, harmful_labels, group_performance, retrieval_skew"),
    ({"harmful_labels": {"neutral": ["a person"], "sensitive": []}}, "harmful_labels.sensitive: expected a non-empty list"),
    ({"group_column": "colour"}, "set group_column="),
    ({"templates": "no_such_set"}, "unknown template set 'no_such_set'"),
])
def test_probe_errors_are_one_line(tmp_path, checkpoint, overrides, message, capsys):
    from vlpretrain.cli.main import main

    table = _table(tmp_path)
    lines = table.read_text().splitlines()
    (tmp_path / "one_red.csv").write_text("\n".join([lines[0], lines[2]] + [l for l in lines if ",blue," in l]) + "\n")
    probe = _probe(tmp_path, **overrides)
    code = main(["eval", "bias", "--model", str(checkpoint), "--probe", str(probe), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
