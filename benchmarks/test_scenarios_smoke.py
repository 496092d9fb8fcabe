"""CPU smoke tests of the scenario harness (`python -m benchmarks.gpu`): what each scenario asks for, the rows it
writes (required keys, errors of peers that cannot run, ratios against the fastest peer that fits a budget), and
RESULTS.md generated from the results file."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys

import pytest

from benchmarks.gpu import loops, ours, report, rows, scenarios, sides
from benchmarks.gpu.__main__ import SCENARIOS, parse_args, run
from benchmarks.gpu.runner import Session, Side

CARD_GIB = rows.card_gib


@pytest.fixture(autouse=True)
def _no_card(monkeypatch):
    """The scenarios plan as on a card too small for the larger passes, whatever GPU this machine has."""
    monkeypatch.setattr(rows, "card_gib", lambda cpu=False: 0.0)


def _session(tmp_path, *scenarios: str, cpu: bool = False, budget_s: float = 560) -> Session:
    prepared = tmp_path / "data" / "parity" / "shards"  # as `prepare` leaves it (parity's plan copies, not builds)
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / "manifest.json").write_text("{}")
    a = parse_args([*scenarios, "--work", str(tmp_path / "work"), "--data", str(tmp_path / "data"),
                    "--budget-s", str(budget_s), *(["--cpu"] if cpu else [])])
    s = Session(a, a.scenarios)
    for name in a.scenarios:
        SCENARIOS[name][0](s)
    return s


def test_run_names_carry_the_budget():
    assert ours.parse("unsloth_auto_mbauto_b16") == {
        "backend": "unsloth", "micro_batch_size": "auto", "gradient_checkpointing": "auto", "max_memory_gib": 16.0}
    assert ours.parse("unsloth_gc_mb8_q4") == {
        "backend": "unsloth", "micro_batch_size": 8, "gradient_checkpointing": True, "load_in_4bit": True}
    assert ours.parse("peft_gc_mb8_liger")["kernels"] == "liger" and ours.parse("peft_gc_mb8_plain")["kernels"] == "none"
    assert ours.parse("auto_auto_mbauto_pw_b16_log10") == {
        "backend": "auto", "micro_batch_size": "auto", "gradient_checkpointing": "auto", "max_memory_gib": 16.0,
        "selective_recompute": "pointwise", "logging_steps": 10}
    for bad, words in (("auto_off_mbauto_b24", "expected BACKEND_auto|gc|nogc_mb(auto|N)"),
                       ("auto_auto_mbauto_cgg_b24", "unknown: cgg")):
        with pytest.raises(ValueError, match=re.escape(words)):
            ours.parse(bad)
    assert loops.parse_variant("rowsfit16_gc_b24") == {"layout": "rows", "micro": 16, "fit": True, "gc": True,
                                                       "budget_gib": 24.0}
    assert loops.parse_variant("rows8_gc")["budget_gib"] is None


def test_frontier_asks_every_budget_of_both_sides_and_shares_processes_with_throughput(tmp_path):
    s = _session(tmp_path, "frontier", "throughput", "startup")
    assert s.wanted["ours"] == ["auto_auto_mbauto", "auto_auto_mbauto_b8", "auto_auto_mbauto_b16",
                                "auto_auto_mbauto_b24", "auto_auto_mbauto_b40", "auto_auto_mb2",
                                "auto_auto_mbauto_nooff_b8", "auto_gc_mb8", "auto_gc_mb8_q4"]
    assert s.wanted["loop"] == ["rows8_gc", "rowsfit16_gc", "rowsfit16_gc_b8", "rowsfit16_gc_b16",
                                "rowsfit16_gc_b24", "rowsfit16_gc_b40"]  # start-up's run first: cold vs warm alike
    assert "th" not in s.wanted and s.wanted["th_b8"] == ["th_b8"]  # training-hub once, under the smallest cap
    assert s.wanted["ours8b"] == ["auto_auto_mbauto_b24"] and s.wanted["loop8b"] == ["rowsfit4_gc_b24"]
    assert s.wanted["ours_warm"] == ["auto_auto_mbauto"] and s.wanted["loop_warm"] == ["rows8_gc"]
    argv = s.sides["th_b8"].argv(s, ["th_b8"], tmp_path, 100)
    assert argv[argv.index("--cap-gib") + 1] == 8


def test_frontier_rows_compare_each_budget_with_the_peers_that_fit_it(tmp_path):
    from benchmarks.gpu.runner import Proc

    s = _session(tmp_path, "frontier")
    ours_tps = {None: 70.0, 8: 45.0, 16: 55.0, 24: 60.0, 40: 65.0}
    loop = {None: (16, 44.0, 9.0), 8: (8, 40.0, 5.5), 16: (16, 44.0, 9.0), 24: (16, 44.0, 9.0), 40: (16, 44.0, 9.0)}
    s.procs["ours"] = Proc("ours", s.wanted["ours"], payloads={
        **{f"auto_auto_mbauto{'' if b is None else f'_b{b}'}": {"tokens_per_s": t, "peak_alloc_gib": 0.9 * (b or 60),
                                                                  "max_memory_gib": b, "shape": "qwen1.5b"}
           for b, t in ours_tps.items()},
        "auto_auto_mb2": {"error": "boom"}})
    s.procs["loop"] = Proc("loop", s.wanted["loop"], payloads={
        f"rowsfit16_gc{'' if b is None else f'_b{b}'}": {"tokens_per_s": t, "peak_alloc_gib": p, "micro_batch": m,
                                                         "budget_gib": b, "shape": "qwen1.5b"}
        for b, (m, t, p) in loop.items()})
    s.procs["th_b8"] = Proc("th_b8", ["th_b8"], payloads={"th_b8": {"tokens_per_s": 13.0, "peak_alloc_gib": 5.9,
                                                                    "budget_gib": 8, "shape": "qwen1.5b"}})
    out = SCENARIOS["frontier"][1](s)
    ours_rows = {r["budget_gib"]: r for r in out if r["role"] == "ours" and r["shape"] == "qwen1.5b" and not r["error"]}
    assert {b: round(r["vs_best_peer"], 3) for b, r in ours_rows.items()} == {
        None: round(70 / 44, 3), 8: round(45 / 40, 3), 16: 1.25, 24: round(60 / 44, 3), 40: round(65 / 44, 3)}
    assert ours_rows[8]["best_peer"] == "Unsloth hand loop, checkpointing on, largest micro that fits"
    assert [r["budget_gib"] for r in out if r["role"] == "peer" and r["shape"] == "qwen1.5b"] == [
        None, 8, 16, 24, 40, 8]
    assert [r["error"] for r in out if "micro_batch_size=2" in r["name"]] == ["boom"]
    big = [r for r in out if r["shape"] == "llama8b"]  # never ran here: rows that say so
    assert [(r["role"], r["budget_gib"], r["seq_len"]) for r in big] == [("ours", 24, 8192), ("peer", 24, 8192)]
    assert all(r["error"] for r in big)


def test_frontier_runs_one_shape_when_asked(tmp_path):
    qwen = _session(tmp_path / "q", "frontier", "--shape", "qwen1.5b")
    assert "ours8b" not in qwen.wanted and "ours" in qwen.wanted
    llama = _session(tmp_path / "l", "frontier", "--shape", "llama8b")
    assert set(llama.wanted) == {"build_llama8b", "ours8b", "loop8b"}
    assert [r["shape"] for r in SCENARIOS["frontier"][1](llama)] == ["llama8b", "llama8b"]


def _row(name, role, tps, budget, peak, **kw):
    return {"name": name, "role": role, "tokens_per_s": tps, "budget_gib": budget, "peak_gib": peak, "error": None,
            "shape": "qwen1.5b", "seq_len": 2048, **kw}


def test_ours_is_compared_with_the_fastest_peer_that_fits_its_budget():
    rs = rows.add_ratios([
        _row("ours b16", "ours", 60.0, 16, 15.0), _row("ours card", "ours", 80.0, None, 40.0),
        _row("loop b16", "peer", 40.0, 16, 9.0), _row("loop b24", "peer", 50.0, 24, 20.0),
        _row("th b8", "peer", 30.0, 8, 6.0), _row("loop card", "peer", 55.0, None, 30.0),
        _row("broken b8", "peer", 99.0, 8, 1.0, error="boom"),
        _row("other shape", "peer", 99.0, 8, 1.0, shape="llama8b"),
    ])
    assert (rs[0]["best_peer"], rs[0]["vs_best_peer"]) == ("loop b16", 1.5)
    assert (rs[1]["best_peer"], rs[1]["vs_best_peer"]) == ("loop card", 80.0 / 55.0)
    assert rows.add_ratios([_row("ours b4", "ours", 1.0, 4, 3.0), _row("th", "peer", 2.0, 8, 6.0)])[0][
        "vs_best_peer"] is None


def test_out_of_time_processes_still_answer_with_a_row_each(tmp_path):
    s = _session(tmp_path, "throughput", budget_s=20)  # < 30 s left: every process is skipped
    s.execute(["ours", "loop"])
    out = SCENARIOS["throughput"][1](s)
    assert [r["role"] for r in out] == ["ours", "ours", "ours", "peer", "peer"]
    assert all(r["error"].startswith("skipped") for r in out)
    assert all(set(rows.REQUIRED) <= set(r) for r in out)


@pytest.mark.parametrize("card_gib", [79.2, 139.8])
def test_throughput_tries_larger_micro_batches_only_where_the_card_holds_them(tmp_path, monkeypatch, card_gib):
    monkeypatch.setattr(rows, "card_gib", lambda cpu=False: card_gib)
    s = _session(tmp_path, "throughput", "frontier", "compiled", budget_s=20)
    big = card_gib > 120
    assert s.wanted.get("ours_card") == (["auto_auto_mb20", "auto_auto_mb24"] if big else None)
    assert "auto_auto_mb20" not in s.wanted["ours"]  # a process of their own, after the loop's
    s.execute(sides.ORDER)
    names = [r["name"] for r in SCENARIOS["throughput"][1](s) if r["role"] == "ours"]
    assert names == ["ours lora_sft() defaults", "ours lora_sft(micro_batch_size=8, gradient_checkpointing=True)",
                     "ours lora_sft(micro_batch_size=8, gradient_checkpointing=True, load_in_4bit=True)"] + (
        ["ours lora_sft(micro_batch_size=20)", "ours lora_sft(micro_batch_size=24)"] if big else [])
    frontier = [r["name"] for r in SCENARIOS["frontier"][1](s) if "micro_batch_size" in r["name"]]
    assert frontier == ["ours lora_sft(micro_batch_size=2)"]  # not compiled's mb2 without CUDA graphs, nor mb20/24


def test_the_card_memory_is_read_from_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    for answer, gib in (("143771", 140.4), ("81559\n81559", 79.6), ("[N/A]", 0.0), ("", 0.0)):
        smi.write_text(f"#!/bin/sh\nprintf '{answer}\\n'\n")
        smi.chmod(0o755)
        assert CARD_GIB() == pytest.approx(gib, abs=0.05), answer
    assert CARD_GIB(cpu=True) == 0.0


def test_a_process_result_gets_its_start_up_from_launch_to_first_step(tmp_path):
    s = _session(tmp_path, "throughput")
    code = ("import json, sys, time; time.sleep(0.3); json.dump({'run': 'a', 'first_step_unix': time.time(), "
            "'tokens_per_s': 5.0}, open(sys.argv[1] + '/a.json', 'w'))")
    s.define("stub", Side(lambda s_, runs, res, cap: [sys.executable, "-c", code, res], cap_s=60, run_field="run",
                          family="stub"))
    s.want("stub", ["a", "b"])
    s.run("stub")
    assert 0.3 <= s.result("stub", "a")[0]["startup_s"] < 30
    assert "no result for b" in s.result("stub", "b")[0]["error"]
    row = s.row("throughput", "stub", "a", "stub a", "peer")
    assert row["tokens_per_s"] == 5.0 and row["run_id"] == s.run_id and row["card"] == "cpu"


def test_lanes_run_the_groups_side_by_side_one_gpu_each(tmp_path):
    from benchmarks.gpu.__main__ import _run_lanes

    s = _session(tmp_path, "throughput")
    code = ("import json, os, sys, time; time.sleep(1); json.dump({'gpu': os.environ.get('CUDA_VISIBLE_DEVICES'), "
            "'t': time.time()}, open(sys.argv[1] + '/r.json', 'w'))")
    s.wanted = {}
    for key in ("ours", "loop", "ours_warm"):
        s.sides[key] = Side(lambda s_, runs, res, cap: [sys.executable, "-c", code, res], cap_s=60, run_field=None,
                            family=key)
        s.want(key, [key])
    _run_lanes(s, 2)
    gpu = {k: s.result(k)[0]["gpu"] for k in ("ours", "loop", "ours_warm")}
    assert gpu["ours"] == gpu["ours_warm"] != gpu["loop"] and {gpu["ours"], gpu["loop"]} == {"0", "1"}
    assert s.result("ours_warm")[0]["t"] > s.result("ours")[0]["t"]  # a group's processes in turn
    assert s.row("throughput", "loop", None, "loop", "peer")["gpu"] == gpu["loop"]


@pytest.mark.slow
def test_throughput_on_the_cpu_writes_rows_and_results_md(tmp_path, tiny_bench):
    out = tmp_path / "results.jsonl"
    data, work = tiny_bench
    args = ["throughput", "--cpu", "--data", str(data), "--work", str(work), "--out", str(out), "--steps", "1",
            "--warmup", "1"]
    written = run(args)
    saved = rows.read(out)
    assert saved == json.loads(json.dumps(written, default=str)) and len(saved) == 3
    for r in saved:
        assert set(rows.REQUIRED) <= set(r), set(rows.REQUIRED) - set(r)
        assert r["scenario"] == "throughput" and r["card"] == "cpu" and r["shape"] == "tiny"
        assert r["command"].startswith("python -m benchmarks.gpu throughput --cpu") and r["versions"]["torch"]
    mine, loop, th = saved
    assert mine["role"] == "ours" and mine["error"] is None and mine["tokens_per_s"] > 0
    assert mine["startup_s"] > mine["warmup_s"] > 0 and mine["config"]["resolved_micro_batch_size"] == 2
    assert "unsloth" in loop["error"] and "training_hub" in th["error"]  # peers that cannot run: rows, not a crash
    assert mine["vs_best_peer"] is None

    md = tmp_path / "RESULTS.md"
    report.main(["--results", str(out), "--out", str(md)])
    text = md.read_text()
    assert "## throughput" in text and "Whole card, Qwen2.5-1.5B shape" in text
    assert f"Command: `{mine['command']}`" in text and "no module 'unsloth'" in text
    assert text.count("| ours lora_sft() defaults | ours | tiny@2048 |  |") == 1


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_scenario_plans_runnable_commands(tmp_path, scenario):
    s = _session(tmp_path, scenario)
    assert s.wanted
    for key, runs in s.wanted.items():
        argv = [str(x) for x in s.sides[key].argv(s, runs, tmp_path / "res", 300)]
        assert argv[0] == sys.executable and all(argv), (key, argv)
        if "-m" in argv:
            module = argv[argv.index("-m") + 1]
            assert importlib.util.find_spec(module), module
    assert "--work" not in s.command and s.command.startswith(f"python -m benchmarks.gpu {scenario}")


def test_cli_names_every_scenario():
    with pytest.raises(SystemExit):
        parse_args(["no-such-scenario"])
    assert set(SCENARIOS) >= {"throughput", "frontier", "startup", "parity", "ddp-scaling", "resume-dead-rank",
                              "model-splitting", "fsdp"}
    assert isinstance(parse_args(["fsdp", "--gpus", "4"]), argparse.Namespace)


def test_offload_compares_each_budget_with_and_without_it(tmp_path):
    s = _session(tmp_path, "offload")
    assert s.wanted["ours"] == [f"auto_auto_mbauto_{levers}_b{b}" for b in (16, 24)
                                for levers in ("nopw_nooff", "nopw_off", "pw_off")]
    assert s.wanted["loop"] == ["rowsfit16_gc_b16", "rowsfit16_gc_b24"]
    assert s.wanted["ours8b"] == ["auto_auto_mbauto_nopw_nooff_b24", "auto_auto_mbauto_pw_off_b24"]
    assert ours.parse("auto_auto_mbauto_nopw_nooff_b24") == {
        "backend": "auto", "micro_batch_size": "auto", "gradient_checkpointing": "auto", "max_memory_gib": 24.0,
        "selective_recompute": "off", "activation_offload": False}
    assert ours.parse("auto_auto_mbauto_pw_off_b24") == {
        "backend": "auto", "micro_batch_size": "auto", "gradient_checkpointing": "auto", "max_memory_gib": 24.0,
        "selective_recompute": "pointwise", "activation_offload": True}


def test_prompts_runs_the_defaults_with_and_without_picking_and_picking_on_the_usual_shards(tmp_path):
    s = _session(tmp_path, "prompts")
    assert s.wanted["ours_prompts"] == ["auto_auto_mbauto", "auto_auto_mbauto_nopick"]
    assert s.wanted["loop_prompts"] == ["rowsfit16_gc"]
    argv = [str(x) for x in s.sides["ours_prompts"].argv(s, s.wanted["ours_prompts"], tmp_path / "res", 300)]
    assert str(tmp_path / "data" / "shards_qwen1.5b_2048_prompts") in argv
    argv = [str(x) for x in s.sides["loop_prompts"].argv(s, s.wanted["loop_prompts"], tmp_path / "res", 300)]
    assert str(tmp_path / "data" / "records_prompts.jsonl") in argv
    assert ours.parse("auto_auto_mbauto_nopick") == ours.parse("auto_auto_mbauto")  # not a lora_sft option
    # and where the share stops paying: the usual records (93% targets) at the default share and at any share
    assert s.wanted["ours_usual"] == ["auto_auto_mbauto_pick75", "auto_auto_mbauto_pick100"]
    argv = [str(x) for x in s.sides["ours_usual"].argv(s, s.wanted["ours_usual"], tmp_path / "res", 300)]
    assert str(tmp_path / "data" / "shards_qwen1.5b_2048") in argv
    assert ours.parse("auto_auto_mbauto_pick100") == ours.parse("auto_auto_mbauto")
    assert [scenarios._ours_label(r) for r in ("auto_auto_mbauto", "auto_auto_mbauto_pick0")] == [
        "ours lora_sft() defaults",
        "ours lora_sft() defaults, logits for the target tokens alone where at most 0% of the tokens are targets"]


def test_prompts_rows_keep_the_usual_records_apart_from_the_other_scenarios_and_the_peer(tmp_path):
    """Run with throughput and frontier (one process of "ours" for both): the usual records' two runs are prompts
    rows alone, without a ratio to the peer of the other feed; the prompts feed's rows have theirs."""
    from benchmarks.gpu.runner import Proc

    s = _session(tmp_path, "prompts", "throughput", "frontier", "--only",
                 "auto_auto_mbauto,auto_auto_mbauto_nopick,auto_auto_mbauto_pick75,auto_auto_mbauto_pick100,"
                 "rowsfit16_gc,rows8_gc")
    assert s.wanted["ours"] == ["auto_auto_mbauto"]
    assert s.wanted["ours_usual"] == ["auto_auto_mbauto_pick75", "auto_auto_mbauto_pick100"]

    def tps(key: str, runs: list[str], t: float) -> None:
        s.procs[key] = Proc(key, runs, payloads={r: {"tokens_per_s": t + i, "peak_alloc_gib": 60.0, "micro_batch": 16,
                                                     "shape": "qwen1.5b"} for i, r in enumerate(runs)})

    for key, t in (("ours", 70.0), ("ours_prompts", 67.0), ("ours_usual", 63.0), ("loop", 44.0),
                   ("loop_prompts", 37.0)):
        tps(key, s.wanted[key], t)
    out = SCENARIOS["prompts"][1](s)
    assert [(r["name"], r["feed"] == scenarios.FEED_OURS.format(seq=2048), r.get("vs_best_peer")) for r in out] == [
        ("ours lora_sft() defaults", False, 67 / 37),
        ("ours lora_sft() defaults, logits for every token", False, 68 / 37),
        ("Unsloth hand loop, checkpointing on, largest micro that fits", False, None),
        ("ours lora_sft() defaults, logits for the target tokens alone where at most 75% of the tokens are targets "
         "(the usual records)", True, None),
        ("ours lora_sft() defaults, logits for the target tokens alone where at most 100% of the tokens are targets "
         "(the usual records)", True, None)]
    assert [r["tokens_per_s"] for r in out] == [67.0, 68.0, 37.0, 63.0, 64.0]
    for name in ("throughput", "frontier"):
        assert not any("target" in r["name"] for r in SCENARIOS[name][1](s)), name


def test_only_keeps_the_named_runs_and_the_model_builds(tmp_path):
    s = _session(tmp_path, "compiled", "--only", "auto_auto_mb2,auto_auto_mb2_nocg,packed2_nogc_varlen")
    assert s.wanted == {"build_qwen1.5b": ["build_qwen1.5b"], "ours": ["auto_auto_mb2", "auto_auto_mb2_nocg"],
                        "loop": ["packed2_nogc_varlen"]}
    s = _session(tmp_path, "compiled", "--only", "packed2_nogc_varlen")
    assert "ours" not in s.wanted  # a process with none of its runs named is not started
    assert not s.unknown_only()
    assert _session(tmp_path, "compiled", "--only", "packed2_nogc_varlen,auto_nogc_mb2_cg").unknown_only() == [
        "auto_nogc_mb2_cg"]


def test_only_writes_the_rows_of_the_named_runs_alone(tmp_path, monkeypatch):
    """Every scenario's rows under --only: no KeyError for a process left out, and no row (not even an error row) for
    a run or a peer that was not named; the named runs' rows are all there."""
    from benchmarks.gpu import __main__ as main

    monkeypatch.setattr(Session, "execute", lambda self, order: None)  # nothing runs: each row carries "not run"
    wrote = []
    monkeypatch.setattr(main.rows, "append", lambda out, path: wrote.extend(out))
    for scenario, only in (("compiled", "packed2_nogc_varlen"), ("compiled", "auto_auto_mb2"),
                           ("throughput", "rows8_gc"), ("frontier", "rowsfit16_gc_b16"),
                           ("offload", "rowsfit16_gc_b16"), ("startup", "rows8_gc"), ("parity", "parity_ours")):
        wrote.clear()
        s = _session(tmp_path, scenario)
        out = main.run([scenario, "--work", str(tmp_path / "work"), "--data", str(tmp_path / "data"), "--only", only])
        assert out == wrote and out, (scenario, only)
        assert all("rows:" not in (r.get("error") or "") for r in out), (scenario, out)
        assert len(out) < len(SCENARIOS[scenario][1](s)), (scenario, only)
    with pytest.raises(SystemExit, match="auto_nogc_mb2_cg"):
        main.run(["compiled", "--work", str(tmp_path / "work"), "--data", str(tmp_path / "data"),
                  "--only", "auto_nogc_mb2_cg"])


@pytest.mark.parametrize(("every", "steady_steps"), [(1, 6), (3, 5)])  # logging_steps: the window starts at a log
def test_our_meter_times_whole_steps_when_logs_arrive_a_step_late(monkeypatch, every, steady_steps):
    """The trainer logs step k while step k + 1 runs and the last step at once: the window is still timed between
    the ends of the first logged step after warm-up and the last step, and holds exactly the tokens of the steps
    between them (timing the logs' arrival would give 5 steps' tokens 4 steps' time, 1.25x too high)."""
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(ours.time, "perf_counter", lambda: clock[0])
    windows = ours.Windows(warmup=1)
    meter = ours._meter_callback(windows)
    state = SimpleNamespace(global_step=0, max_steps=8, num_input_tokens_seen=0)
    control = SimpleNamespace(should_log=False, should_training_stop=False)
    meter.on_train_begin(None, state, control)

    def log(step: int) -> None:
        state.global_step, now = step, state.global_step
        meter.on_log(None, state, control, logs={"loss": 1.0, "tokens_seen": 1000 * step, "tokens_per_s": 1000.0})
        state.global_step = now

    pending = None
    for step in range(1, 9):
        clock[0] = 2.0 * step  # each step: 1,000 tokens in 2 s
        state.global_step = step
        control.should_log = step % every == 0 or step == 8
        control.should_training_stop = step == 8
        meter.on_step_end(None, state, control)
        if pending:
            clock[0] += 1.5  # the previous logged step's log arrives while this one runs
            log(pending)
        pending = step if control.should_log and step < 8 else None
    log(8)
    got = windows.summary()
    assert got["tokens_per_s"] == pytest.approx(500.0) and got["steady_steps"] == steady_steps
    assert got["first_step_s"] == pytest.approx(2.0)


def test_peers_and_ours_read_the_same_records_or_nothing_runs(tmp_path):
    import hashlib

    from benchmarks.gpu.__main__ import check_feed

    data = tmp_path / "data"
    (data / "shards_qwen1.5b_2048").mkdir(parents=True)
    (data / "records.jsonl").write_text('{"messages": []}\n' * 900)
    digest = hashlib.sha256((data / "records.jsonl").read_bytes()).hexdigest()
    (data / "shards_qwen1.5b_2048" / "manifest.json").write_text(json.dumps(
        {"sources": [{"path": ".gpu/records.jsonl", "sha256": digest}]}))
    check_feed(data)
    (data / "records.jsonl").write_text('{"messages": []}\n' * 60)  # another prepare wrote fewer records
    with pytest.raises(SystemExit, match=r"prepared from another .*records\.jsonl"):
        check_feed(data)


def test_the_cpu_smoke_test_never_prepares_over_gpu_inputs(tmp_path, monkeypatch):
    import benchmarks.gpu.__main__ as cli

    data = tmp_path / "data"
    (data / "shards_qwen1.5b_2048").mkdir(parents=True)
    (data / "shards_qwen1.5b_2048" / "manifest.json").write_text("{}")
    (data / "records.jsonl").write_text('{"messages": []}\n' * 900)
    prepared = []

    class Stop(Exception):
        pass

    def session(a, scenarios):
        raise Stop(a.data)

    monkeypatch.setattr(cli, "prepare", lambda out, *args, **kw: prepared.append(out))
    monkeypatch.setattr(cli, "Session", session)
    with pytest.raises(Stop) as stopped:
        cli.run(["throughput", "--cpu", "--data", str(data), "--work", str(tmp_path / "work")])
    assert prepared == [data / "cpu"] and str(stopped.value) == str(data / "cpu")
    assert (data / "records.jsonl").read_text() == '{"messages": []}\n' * 900
