"""The benchmarks' command lines (no Ray is started): the one list syntax, defaults in the help, one-line
errors before any cluster, and the port of `make load-demo`."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys

import pytest

from tests.cli_support import assert_one_line_error, run_cli
from tests.conftest import MAIN_POOL, REPO_ROOT

SCRIPTS = ["clearing_speed", "digital_twin", "histogram_prior", "load_demo", "online_cells", "predictor_overhead",
           "predictor_speed", "reservation_price", "serving_overhead", "slow_headers", "vllm_graph_cost"]


def _script(name: str):
    """benchmarks/NAME.py as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _parse(name: str, *argv: str):
    mod = _script(name)
    return mod.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("name, option, forms, parsed", [
    ("digital_twin", "budgets", [["256,512"], ["256 512"], ["256", "512"]], [256.0, 512.0]),
    ("digital_twin", "policies", [["clear,uniform"], ["clear uniform"]], ["clear", "uniform"]),
    ("load_demo", "streams", [["balanced,u-shaped"], ["balanced u-shaped"]], ["balanced", "u-shaped"]),
    ("serving_overhead", "concurrency", [["1,32"], ["1 32"], ["1", "32"]], [1, 32]),
    ("serving_overhead", "policies", [["clear-paper:beta=0.01,alpha=4,uniform"], ["clear-paper:beta=0.01,alpha=4 uniform"]],
     ["clear-paper:beta=0.01,alpha=4", "uniform"]),
    ("clearing_speed", "sizes", [["1e3,1e4"], ["1000 10000"]], [1000, 10000]),
    ("predictor_speed", "batch_sizes", [["1,8"], ["1 8"]], [1, 8]),
    ("predictor_speed", "device", [["cpu,cuda"], ["cpu", "cuda"]], ["cpu", "cuda"]),
])
def test_list_options_take_commas_or_spaces(name, option, forms, parsed):
    base = ["--traces", str(MAIN_POOL), "--out", "o"] if name == "load_demo" else []
    for form in forms:
        assert getattr(_parse(name, *base, f"--{option.replace('_', '-')}", *form), option) == parsed


def test_a_repeated_device_adds_up():
    assert _parse("predictor_speed", "--device", "cpu", "--device", "cuda").device == ["cpu", "cuda"]


def test_clearing_speed_runs_the_sizes_it_is_given(capsys):
    mod = _script("clearing_speed")
    mod.main(["--sizes", "1e3 2000", "--repeats", "1"])
    rows = [line.split("|")[0].strip() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["1000", "2000"]
    with pytest.raises(SystemExit) as exc:
        mod.main(["--sizes", "1e3,1.5"])
    assert exc.value.code == 2
    assert "argument --sizes" in capsys.readouterr().err


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_help_shows_defaults(name):
    proc = run_cli(f"benchmarks/{name}.py", "--help", timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "default" in proc.stdout and "usage: python benchmarks/" in proc.stdout


@pytest.mark.parametrize("name, argv, prefix", [
    ("digital_twin", ["--budgets", "256 abc"], "argument --budgets"),
    ("digital_twin", ["--n", "0"], "argument --n"),
    ("load_demo", ["--traces", "p", "--out", "o", "--policies", "uniform,bogus"], "argument --policies"),
    ("serving_overhead", ["--concurrency", "0"], "argument --concurrency"),
    ("serving_overhead", ["--graphs", "central,bogus"], "argument --graphs: expected one of central, ingress"),
    ("predictor_overhead", ["--placements", "ingress,gpu"], "argument --placements: expected one of ingress, deployment"),
    ("predictor_speed", ["--batch-sizes", "8,x"], "argument --batch-sizes"),
    ("vllm_graph_cost", ["--rounds", "0"], "argument --rounds"),
    ("reservation_price", ["--in-flight", "0"], "argument --in-flight"),
    ("online_cells", ["--cells", "u-shaped"], "--cells: 'u-shaped' is not STREAM:BUDGET"),
])
def test_a_bad_value_is_argparses_one_line_error(name, argv, prefix, capsys):
    # In process (each script's main, as its __main__ calls it): the --help test above runs them from a shell.
    try:
        code = _script(name).main(argv)  # a run-time check returns its status, argparse exits
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"python benchmarks/{name}.py: error: {prefix}"), err


@pytest.mark.slow  # four interpreters that import Ray
def test_a_missing_pool_or_an_unknown_stream_fails_before_any_cluster(tmp_path):
    proc = run_cli("benchmarks/digital_twin.py", "--traces", str(tmp_path / "nope.jsonl"), timeout=300)
    assert_one_line_error(proc, "python benchmarks/digital_twin.py: error:")
    proc = run_cli("benchmarks/digital_twin.py", "--stream", "bogus", "--n", "5", timeout=300)
    assert_one_line_error(proc, "python benchmarks/digital_twin.py: error: invalid stream='bogus'")
    proc = run_cli("benchmarks/load_demo.py", "--traces", str(MAIN_POOL), "--streams", "balanced bogus",
                   "--out", str(tmp_path), timeout=300)
    assert_one_line_error(proc, "python benchmarks/load_demo.py: error: invalid stream='bogus'")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cli("benchmarks/digital_twin.py", "--json", str(blocker / "twin.json"), timeout=300)
    assert_one_line_error(proc, "python benchmarks/digital_twin.py: error: argument --json: cannot write to")


def test_load_demo_refuses_a_port_in_use_before_starting_ray(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("benchmarks/load_demo.py", "--traces", str(MAIN_POOL), "--port", str(port),
                       "--out", str(tmp_path), timeout=300)
    assert_one_line_error(proc, f"python benchmarks/load_demo.py: error: argument --port: 127.0.0.1:{port} is in use")


@pytest.mark.parametrize("port", [None, "8123"])
def test_make_load_demo_passes_its_port(port):
    argv = ["make", "-n", "load-demo"] + ([f"PORT={port}"] if port else [])
    out = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert f"benchmarks/load_demo.py" in out and f"--port {port or 8000} " in out


def test_histogram_prior_prints_a_held_out_likelihood_per_stream_and_strength(capsys):
    mod = _script("histogram_prior")
    assert mod.main(["--traces", str(MAIN_POOL), "--strengths", "0,30,1e6"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "k=" not in line]
    assert [r[1].strip() for r in rows] == ["balanced", "mostly-easy", "mostly-hard", "u-shaped"]
    for r in rows:
        ll = [float(v) for v in r[2:5]]
        assert all(-20 < v < 0 for v in ll)  # mean log of cell masses (each < 1)
        # A prior a million samples strong ignores the prediction: it cannot fit held-out lengths better
        # than the bins do (the noisy oracle's predictions say a lot).
        assert ll[2] < max(ll[0], ll[1])


@pytest.mark.slow  # runs the benchmark
def test_reservation_price_prints_both_settings_and_the_price_keeps_the_bucket_from_running_dry(capsys):
    mod = _script("reservation_price")
    assert mod.main(["--requests", "400", "--warmup", "50"]) == 0
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| clear-cost")]
    assert [(r[0], r[1]) for r in rows] == [("clear-cost", "off"), ("clear-cost", "on"),
                                            ("clear-cost-emp", "off"), ("clear-cost-emp", "on")]
    for off, on in (rows[0:2], rows[2:4]):
        assert int(off[3]) == 0 and int(on[3]) > 0  # decisions with a reservation price above 0
        finished = [int(r[4].split(" of ")[0]) for r in (off, on)]
        assert finished[1] > finished[0] and int(on[5]) < int(off[5])


@pytest.mark.slow  # runs the benchmark
def test_online_cells_scores_a_cell_as_the_bench_serves_it(capsys):
    """The script's accuracy is the online bench's for the same cell (run_grid, another code path), and its
    lost / won counts are the difference to the budget-filling uniform cap (an identity they must satisfy)."""
    import numpy as np

    from clear_bench.predictions import parse_predictions
    from clear_bench.runner import run_grid
    from clear_core.simulate import solved_mask, uniform_cap_within
    from clear_core.traces import POOL_GENERATION_CAP_TOKENS, load_pool, make_stream

    mod = _script("online_cells")
    assert mod.main(["--traces", str(MAIN_POOL), "--cells", "u-shaped:512", "--seeds", "3"]) == 0
    row = next([c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
               if line.startswith("| u-shaped | 512 | 3 "))
    accuracy, best, lost, won = float(row[3]), float(row[4]), int(row[7].split()[0]), int(row[8])
    problems = load_pool(MAIN_POOL)
    predictions = parse_predictions("oracle-noise:0.5", calibration="binned", problems=problems)
    bench = run_grid(problems, predictions, streams=["u-shaped"], budgets=[512], policies=["clear-cost-emp"],
                     seeds=[3], protocol="online")
    assert accuracy == round(100 * bench[0]["accuracy"], 1)
    stream = make_stream(problems, "u-shaped", mod.N_QUERIES, 3)
    cap = uniform_cap_within(stream.tokens, 512 * len(stream), POOL_GENERATION_CAP_TOKENS)
    fill = solved_mask(np.full(len(stream), cap), stream.tokens, stream.correct)
    assert bench[0]["solved"] - int(fill.sum()) == won - lost
    assert best >= round(100 * fill.mean(), 1)
