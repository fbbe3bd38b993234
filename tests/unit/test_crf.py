"""The linear-chain CRF (``model.crf``): exact against brute force, and through train / export / predict."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distributed_ft.cli import main
from distributed_ft.config import load_config
from distributed_ft.errors import ConfigError
from distributed_ft.modeling import crf
from distributed_ft.modeling.build import load_trained

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _random_case(seed: int, batch: int = 5, length: int = 5, tags: int = 3):
    generator = torch.Generator().manual_seed(seed)
    emissions = torch.randn(batch, length, tags, generator=generator)
    scores = tuple(torch.randn(*shape, generator=generator) for shape in ((tags,), (tags,), (tags, tags)))
    lengths = [length, 1, 0, *torch.randint(1, length + 1, (batch - 3,), generator=generator).tolist()]
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return emissions, mask, scores, lengths


def _brute_scores(emissions, scores, n: int, allowed=None) -> dict[tuple[int, ...], float]:
    """Every tag sequence of length ``n`` and its score, summed term by term in Python floats."""
    start, end, transitions = (s.tolist() for s in scores)
    out = {}
    for path in itertools.product(range(len(start)), repeat=n):
        if allowed is not None and not allowed(path):
            continue
        total = start[path[0]] + float(emissions[0, path[0]]) + end[path[-1]]
        for t in range(1, n):
            total += transitions[path[t - 1]][path[t]] + float(emissions[t, path[t]])
        out[path] = total
    return out


@pytest.mark.parametrize("seed", range(6))
def test_viterbi_and_log_partition_equal_brute_force(seed):
    emissions, mask, scores, lengths = _random_case(seed, tags=2 + seed % 3)
    paths = crf.viterbi(emissions, mask, scores)
    log_z = crf.log_partition(emissions, mask, scores)
    for row, n in enumerate(lengths):
        if n == 0:
            assert log_z[row] == 0 and (paths[row] == -1).all()
            continue
        brute = _brute_scores(emissions[row], scores, n)
        assert tuple(paths[row, :n].tolist()) == max(brute, key=brute.get)
        assert (paths[row, n:] == -1).all()
        assert log_z[row].item() == pytest.approx(
            math.log(sum(math.exp(v) for v in brute.values())), abs=1e-4
        )
        tags = torch.randint(0, emissions.shape[2], (1, emissions.shape[1]))
        one = crf.path_score(emissions[row : row + 1], tags, mask[row : row + 1], scores)
        assert one.item() == pytest.approx(brute[tuple(tags[0, :n].tolist())], abs=1e-4)


def test_nll_is_positive_and_trains_every_score():
    emissions, mask, _, _ = _random_case(7, tags=4)
    emissions.requires_grad_(True)
    layer = crf.LinearChainCRF(4)
    torch.nn.init.normal_(layer.transitions)
    tags = torch.randint(0, 4, mask.shape)
    loss = crf.nll(emissions, tags, mask, layer())
    assert loss.dtype == torch.float32 and loss.item() > 0
    loss.backward()
    for grad in (emissions.grad, layer.start.grad, layer.end.grad, layer.transitions.grad):
        assert grad is not None and grad.abs().sum() > 0
    assert (emissions.grad[~mask] == 0).all()  # positions past each sentence's end take no part


def test_bf16_emissions_are_scored_in_float32():
    emissions, mask, scores, _ = _random_case(3)
    low = crf.log_partition(emissions.bfloat16(), mask, scores)
    assert low.dtype == torch.float32
    assert torch.allclose(low, crf.log_partition(emissions.bfloat16().float(), mask, scores))


def test_iob2_constraints_forbid_inside_tags_after_other_types():
    start, transitions = crf.iob2_allowed(LABELS)
    assert start.tolist() == [True, True, False, True, False]
    assert transitions[:, 2].tolist() == [False, True, True, False, False]  # I-PER after B-PER / I-PER only
    assert transitions[:, [0, 1, 3]].all()

    def valid(path):
        tags = [LABELS[i] for i in path]
        previous = ["O", *tags[:-1]]
        return all(not t.startswith("I-") or p[2:] == t[2:] for t, p in zip(tags, previous, strict=True))

    emissions, mask, _, lengths = _random_case(11, tags=len(LABELS))
    layer = crf.LinearChainCRF(len(LABELS), (start, transitions))
    with torch.no_grad():  # large scores for the forbidden moves: the constraint has to win
        layer.transitions.copy_(torch.where(transitions, 0.0, 50.0))
        layer.start.copy_(torch.where(start, 0.0, 50.0))
    scores = layer()
    paths = crf.viterbi(emissions, mask, scores)
    for row, n in enumerate(lengths):
        if n:
            brute = _brute_scores(emissions[row], scores, n, allowed=valid)
            assert tuple(paths[row, :n].tolist()) == max(brute, key=brute.get)


def test_compact_moves_positions_left_in_order():
    labels = torch.tensor([[-100, 3, -100, 1, 2], [4, -100, -100, -100, 0]])
    mask = labels != -100
    values, moved = crf.compact(labels, mask)
    assert values[moved].tolist() == [3, 1, 2, 4, 0]
    assert moved.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    emissions = torch.arange(10.0).reshape(2, 5, 1).expand(2, 5, 3)
    assert crf.compact(emissions, mask)[0][:, :2, 0].tolist() == [[1.0, 3.0], [5.0, 9.0]]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.crf=true", "data.label_all_subtokens=true"], "data.label_all_subtokens=false"),
        (["model.crf=false", "model.crf_constraints=none"], "set model.crf=true"),
    ],
)
def test_crf_config_errors(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("ner-conll2003", overrides)


def test_crf_is_for_token_classification_only():
    with pytest.raises(ConfigError, match="task=sequence_classification has no CRF"):
        load_config("text-classification", ["model.crf=true"])
    assert load_config("ner-conll2003", ["model.crf=true"])[0].model.crf_constraints == "iob2"


# --------------------------------------------------------------------------- a tiny NER job with a CRF
def _events(run_dir, kind):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == kind]


def _crf_weights(export):
    with safe_open(str(export / "model.safetensors"), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith("crf.")}  # noqa: SIM118


@pytest.fixture(scope="module")
def crf_run(tiny_bert, tiny_conll, tmp_path_factory, one_torch_thread):
    tmp = tmp_path_factory.mktemp("crf-run")
    overrides = [
        f"model.name={tiny_bert}",
        *[f"data.{split}={path}" for split, path in tiny_conll.items()],
        f"data.cache_dir={tmp / 'cache'}",
        "data.max_train_samples=null",
        "data.max_eval_samples=null",
        "data.max_length=64",
        f"run.output_dir={tmp / 'run'}",
        "run.progress=false",
        "track.report=false",
        "train.epochs=3",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.log_every=1",
        "model.crf=true",
    ]
    assert main(["-q", "train", "ner-conll2003", *overrides]) == 0
    return tmp / "run", tiny_conll, overrides


def test_crf_job_trains_evaluates_and_exports(crf_run):
    run_dir, _, _ = crf_run
    losses = [r["loss"] for r in _events(run_dir, "train")]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["f1"] > 0.6
    export = run_dir / "export"
    assert json.loads((export / "config.json").read_text())[crf.CONFIG_KEY] == {"constraints": "iob2"}
    weights = _crf_weights(export)
    assert set(weights) == {"crf.start", "crf.end", "crf.transitions"}
    assert weights["crf.transitions"].abs().sum() > 0  # trained away from its zero start


def test_export_loads_in_plain_transformers_without_the_crf(crf_run):
    from transformers import AutoModelForTokenClassification, pipeline

    export = crf_run[0] / "export"
    plain = AutoModelForTokenClassification.from_pretrained(str(export))
    assert not hasattr(plain, "crf")
    entities = pipeline("token-classification", model=str(export), aggregation_strategy="simple")(
        "john smith visited paris with nato"
    )
    assert entities and {e["entity_group"] for e in entities} <= {"PER", "LOC", "ORG"}
    ours = load_trained("token_classification", str(export))
    for name, value in _crf_weights(export).items():
        assert torch.equal(ours.get_parameter(name), value)


def test_dft_evaluate_decodes_with_the_crf(crf_run, capsys):
    run_dir, conll, _ = crf_run
    capsys.readouterr()
    assert main(["-q", "evaluate", str(run_dir), f"data.test={conll['test']}", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    results = json.loads((run_dir / "results.json").read_text())
    assert metrics["f1"] == pytest.approx(results["test"]["f1"])


def _predicted_tags(path) -> list[list[str]]:
    sentences, current = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            current.append(line.split()[-1])
        elif current:
            sentences.append(current)
            current = []
    return sentences + ([current] if current else [])


def test_predict_from_the_export_uses_viterbi(crf_run, tmp_path):
    """Transitions forcing ``B-LOC O O ...``: Viterbi follows them, the argmax of the emissions does not."""
    run_dir, conll, _ = crf_run
    forced = tmp_path / "forced"
    shutil.copytree(run_dir / "export", forced)
    config = json.loads((forced / "config.json").read_text())
    label2id = config["label2id"]
    weights = load_file(str(forced / "model.safetensors"))
    num = len(label2id)
    weights["crf.start"] = torch.zeros(num)
    weights["crf.start"][label2id["B-LOC"]] = 1e3
    weights["crf.transitions"] = torch.zeros(num, num)
    weights["crf.transitions"][:, label2id["O"]] = 1e3
    save_file(weights, str(forced / "model.safetensors"), metadata={"format": "pt"})

    def predicted(model_dir) -> list[list[str]]:
        out = tmp_path / f"{model_dir.name}.conll"
        args = ["-q", "predict", str(model_dir), "--input", str(conll["test"]), "--format", "conll"]
        assert main([*args, "--output", str(out)]) == 0
        return _predicted_tags(out)

    viterbi = predicted(forced)
    assert viterbi and all(tags == ["B-LOC"] + ["O"] * (len(tags) - 1) for tags in viterbi)
    plain = tmp_path / "plain"  # the same weights without the CRF's config entry: argmax
    shutil.copytree(forced, plain)
    config.pop(crf.CONFIG_KEY)
    (plain / "config.json").write_text(json.dumps(config))
    argmax = predicted(plain)
    assert len(argmax) == len(viterbi) and argmax != viterbi
    assert any(tag.endswith("PER") for tags in argmax for tag in tags)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["peft.method=lora", "peft.r=4"], id="lora"),
        pytest.param(["run.engine=deepspeed", "deepspeed.zero_stage=2"], id="zero2"),
        pytest.param(["run.engine=deepspeed", "deepspeed.zero_stage=3"], id="zero3", marks=pytest.mark.slow),
    ],
)
def test_crf_trains_under_lora_and_zero(crf_run, tmp_path, extra):
    """The CRF is a head like the classifier: trained in full under LoRA, by DeepSpeed ZeRO-2 and -3."""
    _, _, overrides = crf_run
    job = [o for o in overrides if not o.startswith(("run.output_dir", "train.epochs"))]
    job += [f"run.output_dir={tmp_path / 'run'}", "train.max_steps=4", "data.validation=null", *extra]
    if "run.engine=deepspeed" in extra:  # a fresh process: DeepSpeed keeps its groups in globals
        pytest.importorskip("deepspeed")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env = {k: v for k, v in env.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        command = [sys.executable, "-m", "distributed_ft", "-q", "train", "ner-conll2003", *job]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert main(["-q", "train", "ner-conll2003", *job]) == 0
    export = tmp_path / "run" / "export"
    model = load_trained("token_classification", str(export))
    inner = crf.owner(model)
    assert inner is not None
    ids = torch.tensor([[2, 10, 11, 3]])
    with torch.no_grad():
        _, end, transitions = model(input_ids=ids, attention_mask=torch.ones_like(ids))["crf"]
    assert transitions.shape == (len(inner.config.id2label),) * 2
    assert end.abs().sum() > 0 and torch.isfinite(transitions).all()  # the trained CRF (not a fresh one)
    if "peft.method=lora" in extra:  # merged into a full model, the CRF stays, with the adapter's weights
        merged = tmp_path / "merged"
        assert main(["-q", "export", str(tmp_path / "run"), "--out", str(merged), "--merge-lora"]) == 0
        assert not (merged / "adapter_config.json").exists()
        assert torch.equal(load_trained("token_classification", str(merged)).crf.end, end)


def test_an_export_that_lost_the_crf_weights_is_refused(crf_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(crf_run[0] / "export", broken)
    weights = load_file(str(broken / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not k.startswith("crf.")}
    save_file(kept, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="no safetensors file there holds its crf"):
        load_trained("token_classification", str(broken))


@pytest.mark.parametrize("with_crf", [False, True])
def test_training_from_a_crf_export_builds_only_what_the_job_asks(crf_run, with_crf):
    from distributed_ft.tasks import get_task

    config, _ = load_config("ner-conll2003", [f"model.name={crf_run[0] / 'export'}", f"model.crf={with_crf}"])
    labels = json.loads((crf_run[0] / "labels.json").read_text())
    model = get_task(config).build_model(labels)
    assert hasattr(model, "crf") is with_crf
    assert (crf.CONFIG_KEY in model.config.to_dict()) is with_crf
    if with_crf:
        assert model.crf.transitions.abs().sum() == 0  # a fresh CRF
