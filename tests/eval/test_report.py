"""The comparison report and the `hfa eval` command, on tiny local models."""

import json

import pytest

from hf_efficient_attn.cli import main
from hf_efficient_attn.eval import evaluate_models, format_table, to_markdown, write_report

from .tiny import TEXT, byte_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def reports():
    tok = byte_tokenizer()
    entries = [("base", tiny_llama(seed=0), tok), ("fewer-kv", tiny_llama(seed=1, kv_heads=1), tok),
               ("other-tokenizer", tiny_llama(seed=2), byte_tokenizer(bos=True))]
    return evaluate_models(entries, [TEXT, TEXT.upper()], context_length=64, stride=32,
                           speed_contexts=(8, 16), decode_tokens=2, progress=False)


def test_rows_and_deltas(reports):
    base, fewer, other = reports
    assert [r.model for r in reports] == ["base", "fewer-kv", "other-tokenizer"]
    assert base.delta_ppl == 0 and fewer.delta_ppl == pytest.approx(fewer.ppl - base.ppl)
    assert other.delta_ppl is None and "not comparable" in other.note  # other tokens: no Δ
    assert base.kv_bytes_per_token == 2 * 2 * 2 * 8 * 4 and fewer.kv_bytes_per_token == base.kv_bytes_per_token / 2
    assert base.kv_tokens == 64 and [p["context"] for p in base.speed] == [8, 16]
    assert base.decode_tok_s() == base.speed[1]["decode_tok_s"]  # the largest context <= eval context
    assert base.params > fewer.params
    assert base.protocol["data"] == "list[2]" and base.protocol["stride"] == 32


def test_table_and_markdown(reports):
    table = format_table(reports)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["model", "ppl", "Δppl"] and "KV bytes/token @64" in lines[0]
    assert lines[2].startswith("base") and "—" in lines[2] and "n/a" in lines[4]
    assert f"{reports[1].delta_ppl:+.3f}" in lines[3] and f"{reports[0].ppl:.3f}" in lines[2]
    assert "protocol: data list[2]" in table and "stride 32" in table
    md = to_markdown(reports)
    assert md.startswith("| model | ppl | Δppl |") and "| base |" in md and "Decode speed" in md


def test_write_report(reports, tmp_path):
    files = write_report(reports, tmp_path / "out")
    payload = json.loads(files["json"].read_text())
    assert [m["model"] for m in payload["models"]] == ["base", "fewer-kv", "other-tokenizer"]
    assert payload["models"][1]["kv_bytes_per_token"] == reports[1].kv_bytes_per_token
    assert payload["models"][0]["protocol"]["context_length"] == 64
    assert files["markdown"].read_text() == to_markdown(reports)
    pytest.importorskip("matplotlib")
    assert sorted(p.name for p in files["plots"]) == ["decode_speed.png", "ppl_vs_kv_bytes.png"]
    assert all(p.stat().st_size > 1000 for p in files["plots"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["report.json", "report.md", "decode_speed.png", "ppl_vs_kv_bytes.png"])  # no temp files left


def _save(path, seed, kv_heads=2):
    tiny_llama(seed=seed, kv_heads=kv_heads).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def test_cli_eval(tmp_path, capsys):
    a, b = _save(tmp_path / "a", 0), _save(tmp_path / "b", 1, kv_heads=1)
    (tmp_path / "text.txt").write_text(TEXT * 2)
    rc = main(["eval", a, b, "--data", str(tmp_path / "text.txt"), "--context", "64", "--stride", "32",
               "--max-tokens", "300", "--speed-contexts", "8,16", "--decode-tokens", "2", "--out",
               str(tmp_path / "rep"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Δppl" in out and a in out and b in out and "299 scored tokens" in out and "stride 32" in out
    payload = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert payload["models"][1]["kv_bytes_per_token"] == payload["models"][0]["kv_bytes_per_token"] / 2
    assert (tmp_path / "rep" / "report.md").exists()


def test_cli_eval_errors_are_one_clear_line(tmp_path, capsys):
    a = _save(tmp_path / "a", 0)
    rc = main(["eval", a, "--data", TEXT, "--context", "16", "--stride", "17", "--no-speed", "--out",
               str(tmp_path / "rep"), "--quiet"])
    err = capsys.readouterr().err.splitlines()[-1]  # (earlier lines: progress bars of save_pretrained)
    assert rc == 2 and err.startswith("hfa eval: error: stride 17 is larger than")
    rc = main(["eval", str(tmp_path / "missing"), "--out", str(tmp_path / "rep"), "--quiet"])
    assert rc == 2 and "no model at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", a, "--speed-contexts", "8,x"])


def test_device_is_checked_against_the_machine(tmp_path, capsys, monkeypatch):
    import torch

    from hf_efficient_attn.errors import OptionError
    from hf_efficient_attn.eval.models import load_model, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(OptionError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(OptionError, match="runs on cpu or cuda"):
        resolve_device("meta")
    with pytest.raises(OptionError, match="is not a device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(OptionError, match="has 1 CUDA device"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a = _save(tmp_path / "a", 0)
    model, _ = load_model(a, device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    for cmd in (["eval", a, "--no-speed", "--out", str(tmp_path / "rep"), "--quiet"], ["patch-check", a],
                ["demo", "--quick"]):
        rc = main([*cmd, "--device", "cuda"])
        err = capsys.readouterr().err.splitlines()[-1]
        assert rc == 2 and "no CUDA GPU" in err, (cmd, err)


def test_demo_conversions_are_the_one_list(monkeypatch):
    """`hfa demo` runs exactly DEMO_CONVERSIONS, one entry each, in order: the rows the README shows."""
    from hf_efficient_attn.eval import report

    labels = [s.label for s in report.demo_conversions()]
    assert labels[:4] == ["gqa kv=1 mean", "gqa kv=1 aligned", "gqa kv=1 pca", "gqa kv=1 pca + heal"]
    assert len(set(labels)) == len(labels)

    def build(model, tokenizer, calibration, max_tokens=None):
        return model

    listed = [report.DemoConversion("extra", "gqa", {"num_kv_heads": 1}), report.DemoConversion("mla r=32", build=build)]
    monkeypatch.setattr(report, "DEMO_CONVERSIONS", listed)
    steps = report.demo_conversions()
    assert [s.label for s in steps] == ["extra", "mla r=32"]
    assert steps[1].build is build and steps[0].method == "gqa" and steps[0].kind == "gqa"


def test_demo_runs_every_registered_method():
    """Every conversion, sparse pattern and KV policy the package registers has a demo row: a method that lands
    without one fails here."""
    import hf_efficient_attn as hfa
    from hf_efficient_attn.conversions import CONVERSIONS
    from hf_efficient_attn.eval import report

    steps = report.demo_conversions()
    conversions = {s.method for s in steps if s.kind not in ("sparse", "kv")}
    patterns = {s.method for s in steps if s.kind == "sparse"}
    policies = {s.method for s in steps if s.kind == "kv"}
    assert conversions | set(report.DEMO_ENCODER_CONVERSIONS) == set(CONVERSIONS)   # encoders: the demo's last step
    assert not conversions & set(report.DEMO_ENCODER_CONVERSIONS)
    assert patterns == set(hfa.sparse.PATTERNS) - {"full"}   # "full" is the exact control, the dense row itself
    assert policies == set(hfa.kv.POLICIES)
    for s in steps:   # the options are the factories' / conversions' own
        if s.kind == "sparse":
            hfa.sparse.PATTERNS[s.method](**s.options)
        elif s.kind == "kv":
            hfa.kv.POLICIES[s.method](**s.options)
        else:
            assert set(s.options) <= set(hfa.conversions.options_of(s.method)), s.label
    healed = {s.method for s in steps if s.stages}
    assert {"gqa", "mla", "linear", "mamba2"} <= healed


def test_demo_quick_budget_scales_heals_and_calibration():
    from hf_efficient_attn.eval import report

    step = next(s for s in report.demo_conversions() if s.method == "mla" and s.stages)
    quick = report._scaled(step, report.QUICK)
    assert quick.heal_budget == max(4 * 256, step.heal_budget // 16)   # at least one batch
    assert quick.options["calibration_tokens"] == 512
    full = report._scaled(step, report.FULL)
    assert full.stages == step.stages and full.options == step.options
    assert quick.stages[0]["seq_len"] == step.stages[0]["seq_len"]


def _step(kind):
    from hf_efficient_attn.eval import report
    return next(s for s in report.demo_conversions() if s.kind == kind)


def test_demo_sparse_row_is_a_patched_copy_and_the_base_stays_dense():
    import hf_efficient_attn as hfa
    from hf_efficient_attn.eval import report

    step = _step("sparse")
    base = tiny_llama()
    new = report._run_conversion(step, base, byte_tokenizer(), None, None, 0)
    want = hfa.sparse.PATTERNS[step.method](**step.options).name
    assert new is not base and hfa.sparse.pattern_of(new).name == want and hfa.sparse.is_sparse(new)
    assert hfa.sparse.pattern_of(base) is None and not hfa.is_patched(base)
    assert new.get_input_embeddings().weight is base.get_input_embeddings().weight   # weights shared, not copied


def test_write_report_without_matplotlib(reports, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # plots are an optional extra
    files = write_report(reports, tmp_path)
    assert files["plots"] == [] and files["json"].exists() and files["markdown"].exists()


def test_sparse_rows_beside_dense_with_density_layer_error_and_passkey():
    import hf_efficient_attn as hfa
    tok = byte_tokenizer()
    model = tiny_llama(seed=0)
    reps = evaluate_models([("base", model, tok)], TEXT * 3, context_length=128, speed_contexts=(), progress=False,
                           sparse=[hfa.sparse.full(block=16), hfa.sparse.streaming(1, 32, block=16)],
                           passkey_lengths=(300,))
    dense, full, stream = reps
    assert [r.model for r in reps] == ["base", "base + full_b16", "base + streaming_s1_w32"]
    assert dense.pattern is None and dense.density is None and dense.layer_errors is None
    assert full.ppl == pytest.approx(dense.ppl, rel=1e-5) and full.density == 1.0 and not full.approximate
    assert full.layer_error < 1e-5 and not full.note
    assert stream.approximate and 0 < stream.density < 1 and stream.layer_error > 1e-3
    assert list(stream.layer_errors) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "approximate" in stream.note and f"{stream.density:.3f}" in stream.note
    assert stream.ppl != pytest.approx(dense.ppl, rel=1e-3)
    assert all(set(r.passkey) == {300} and len(r.passkey_detail[0]["trials"]) == 5 for r in reps)
    assert hfa.sparse.pattern_of(model) is None and not hfa.is_patched(model)  # the model comes back as it was
    table = format_table(reps).splitlines()
    assert table[0].split()[:4] == ["model", "density", "layer", "err"] and "passkey @300" in table[0]
    assert table[2].split()[1] == "dense" and "(approx.)" in table[4] and "(approx.)" not in table[3]
    assert "| density | layer err |" in to_markdown(reps)


def test_cli_eval_sparse_and_passkey(tmp_path, capsys):
    a = _save(tmp_path / "a", 0)
    rc = main(["eval", a, "--data", TEXT * 3, "--context", "128", "--no-speed", "--sparse", "streaming:sinks=1,"
               "window=32,block=16", "--passkey", "300", "--out", str(tmp_path / "rep"), "--quiet", "--no-plots"])
    out = capsys.readouterr().out
    assert rc == 0 and "streaming_s1_w32 (approx.)" in out and "passkey @300" in out
    payload = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert payload["models"][1]["pattern"] == "streaming_s1_w32" and payload["models"][1]["layer_error"] > 0
    for bad, match in [("nope", "unknown sparse pattern"), ("top_p:gama=0.9", "top_p takes the options gamma=0.95, block=64"),
                       ("top_p:gamma", "KEY=VALUE")]:
        with pytest.raises(SystemExit):
            main(["eval", a, "--sparse", bad])
        assert match in capsys.readouterr().err


def test_demo_kv_row_is_a_patched_copy_and_the_base_keeps_its_cache():
    import hf_efficient_attn as hfa
    from hf_efficient_attn.eval import report

    step = _step("kv")
    base = tiny_llama()
    new = report._run_conversion(step, base, byte_tokenizer(), None, None, 0)
    assert new is not base and hfa.kv.policy_of(new).name == hfa.kv.POLICIES[step.method](**step.options).name
    assert hfa.kv.policy_of(base) is None and not hfa.is_patched(base)
    assert new.lm_head.weight is base.lm_head.weight


def test_kv_rows_beside_the_full_cache_with_the_streaming_protocol():
    import hf_efficient_attn as hfa
    tok = byte_tokenizer()
    model = tiny_llama(seed=0)
    reps = evaluate_models([("base", model, tok)], TEXT * 3, context_length=128, speed_contexts=(), progress=False,
                           kv=[hfa.kv.streaming(2, 500), hfa.kv.streaming(2, 16)], stream_tokens=24)
    full, lossless, small = reps
    assert [r.model for r in reps] == ["base", "base + streaming_s2_w500", "base + streaming_s2_w16"]
    assert full.kv_policy is None and not full.approximate and full.stream_ppl is not None
    assert lossless.stream_ppl == pytest.approx(full.stream_ppl, rel=1e-5) and lossless.approximate
    assert small.stream_ppl != pytest.approx(full.stream_ppl, rel=1e-3)
    assert small.kv_cache_bytes < full.kv_cache_bytes and "streaming_s2_w16" in small.note
    assert full.stream_protocol["token_stream_sha256"] == small.stream_protocol["token_stream_sha256"]
    assert hfa.kv.policy_of(model) is None and not hfa.is_patched(model)
    table = format_table(reps).splitlines()
    assert "stream ppl" in table[0] and "Δstream" in table[0] and "(approx.)" in table[4]


def test_cli_eval_kv(tmp_path, capsys):
    a = _save(tmp_path / "a", 0)
    rc = main(["eval", a, "--data", TEXT * 3, "--context", "128", "--no-speed", "--kv", "streaming:sinks=1,window=16",
               "--stream-tokens", "16", "--out", str(tmp_path / "rep"), "--quiet", "--no-plots"])
    out = capsys.readouterr().out
    assert rc == 0 and "streaming_s1_w16 (approx.)" in out and "stream ppl" in out
    payload = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert payload["models"][1]["kv_policy"] == "streaming_s1_w16" and payload["models"][1]["stream_ppl"] > 0
    for bad, match in [("h2o", "unknown KV policy"), ("snapkv:budgt=3", "snapkv takes the options")]:
        with pytest.raises(SystemExit):
            main(["eval", a, "--kv", bad])
        assert match in capsys.readouterr().err


def test_long_cache_bytes_without_compute_equal_the_real_cache():
    """The meta-device forward counts the same cache as a real forward, for a dense and a converted model; a sparse
    prefill pattern keeps the dense cache; a KV policy's cache is measured for real."""
    import hf_efficient_attn as hfa
    from hf_efficient_attn.eval import kv_cache_bytes, report
    from hf_efficient_attn.eval.cost import kv_cache_bytes_at_length

    base = tiny_llama()
    linear = hfa.convert(base, "linear", window=8)
    for model in (base, hfa.convert(base, "gqa", num_kv_heads=1, method="mean"), linear):
        for n in (5, 40):
            assert kv_cache_bytes_at_length(model, n) == kv_cache_bytes(model, tokens=n)
    assert kv_cache_bytes_at_length(linear, 300) == kv_cache_bytes_at_length(linear, 40)   # a constant-size cache
    sparse = hfa.patch(tiny_llama(), sparse=hfa.sparse.streaming(1, 16))
    assert kv_cache_bytes_at_length(sparse, 40) is None                    # its plan reads the data
    assert report._long_cache_bytes(sparse, 40) == kv_cache_bytes(base, tokens=40) == kv_cache_bytes(sparse, tokens=40)
    assert hfa.sparse.pattern_of(sparse) is not None                       # still patched
    policy = hfa.patch(tiny_llama(), kv=hfa.kv.streaming(2, 8))
    assert report._long_cache_bytes(policy, 60) == kv_cache_bytes(policy, tokens=60) < kv_cache_bytes(base, tokens=60)


def test_speed_rounds_interleave_rows_and_report_median_and_spread(monkeypatch):
    from hf_efficient_attn.eval import cost, report

    calls = []
    real = cost.measure_speed

    def spy(model, *args, **kwargs):
        calls.append(id(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(report, "measure_speed", spy)
    tok = byte_tokenizer()
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    reps = evaluate_models([("a", a, tok), ("b", b, tok)], TEXT, context_length=32, speed_contexts=(8,),
                           decode_tokens=2, speed_rounds=3, progress=False)
    assert calls == [id(a), id(b)] * 3          # rows take turns, round by round
    for r in reps:
        (point,) = r.speed
        assert point["repeats"] == 3 and point["decode_tok_s_min"] <= point["decode_tok_s"] <= point["decode_tok_s_max"]
    assert "(median of 3, min–max)" in format_table(reps).splitlines()[0]
    with pytest.raises(ValueError, match="speed_rounds"):
        evaluate_models([("a", a, tok)], TEXT, speed_rounds=0, progress=False)


def test_merge_speed():
    from hf_efficient_attn.eval.cost import SpeedPoint, merge_speed

    runs = [[SpeedPoint(8, t, 8 / t, 4, 2 * t, 4 / (2 * t), 100)] for t in (1.0, 3.0, 2.0)]
    (p,) = merge_speed(runs)
    assert (p.prefill_s, p.decode_s, p.repeats) == (2.0, 4.0, 3)
    assert (p.decode_tok_s_min, p.decode_tok_s, p.decode_tok_s_max) == pytest.approx((4 / 6, 1.0, 2.0))
    with pytest.raises(ValueError, match="different context"):
        merge_speed([runs[0], [SpeedPoint(16, 1.0, 16.0, 4, 1.0, 4.0)]])


def test_bits_per_byte_heal_tokens_and_family_in_rows():
    import hf_efficient_attn as hfa
    tok = byte_tokenizer()
    base = tiny_llama()
    new = hfa.convert(base, "gqa", num_kv_heads=1, method="mean")
    hfa.distill(new, base, [TEXT] * 4, tokenizer=tok, max_tokens=64, seq_len=16, batch_size=2, progress=False)
    reps = evaluate_models([("base", base, tok), ("gqa", new, tok)], TEXT, context_length=32, speed_contexts=(),
                           kv_long_tokens=100, progress=False)
    assert reps[0].bits_per_byte == pytest.approx(reps[0].nll / 0.6931471805599453)   # one byte per token
    assert (reps[0].heal_tokens, reps[1].heal_tokens) == (0, 64)
    assert (reps[0].family, reps[1].family) == ("dense", "gqa")
    assert reps[1].kv_long_bytes_per_token == reps[0].kv_long_bytes_per_token / 2 and reps[0].kv_long_tokens == 100
    header = format_table(reps).splitlines()[0]
    assert "bits/byte" in header and "KV bytes/token @100" in header and "heal tokens" in header


def test_pareto_points_use_the_protocol_where_each_method_acts(tmp_path):
    import hf_efficient_attn as hfa
    from hf_efficient_attn.eval import report

    tok = byte_tokenizer()
    model = tiny_llama()
    reps = evaluate_models([("base", model, tok)], TEXT * 3, context_length=128, speed_contexts=(), progress=False,
                           kv=[hfa.kv.streaming(2, 16)], stream_tokens=24, kv_long_tokens=200)
    base, policy = report.pareto_points(reps)
    assert (base["x"], base["y"], base["family"]) == (reps[0].kv_long_bytes_per_token, 1.0, "dense")
    assert policy["y"] == pytest.approx(reps[1].stream_ppl / reps[0].stream_ppl) and policy["protocol"] == "decode"
    assert policy["x"] < base["x"] and policy["family"] == "kv"
    pts = [{"x": 1, "y": 3}, {"x": 2, "y": 2}, {"x": 2, "y": 5}, {"x": 4, "y": 1}, {"x": 5, "y": 1.5}]
    assert report.pareto_frontier(pts) == [pts[0], pts[1], pts[3]]
    payload = json.loads(write_report(reps, tmp_path)["json"].read_text())
    assert [p["label"] for p in payload["pareto"]] == ["base", "base + streaming_s2_w16"]
