"""What the commands print: progress bars on a terminal only, log lines above them, one AP unit, no -1 values."""
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import detkit.utils.progress as progress
from detkit.cli import DEMO_IMAGE_SIZES, DEMO_SPLITS, build_parser, main, shipped_config
from detkit.data.synth import generate
from detkit.engine.metrics import MetricsWriter
from detkit.engine.zoo import COLUMNS
from detkit.evaluation import coco_eval
from detkit.evaluation.coco_eval import evaluate, save_evaluation

REPO = Path(__file__).resolve().parents[1]
BAR_CODES = ("\r", "\x1b[")  # a redraw and an ANSI escape: neither belongs in a redirected log


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what was written."""

    def isatty(self) -> bool:
        return True


def as_terminal(monkeypatch) -> FakeTerminal:
    """sys.stderr as a terminal, with the root logger writing to it as `detkit`'s console logging does. Called in
    the test itself: pytest's output capture replaces sys.stderr after the fixtures are set up."""
    stream = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stream)
    handler = logging.StreamHandler(stream)  # its stream is sys.stderr: the console handler tqdm redirects
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    return stream


def _lines(text: str) -> list[str]:
    """The pieces a terminal shows on lines of their own, roughly: a carriage return or a cursor movement (tqdm
    moves up to redraw a bar below another) starts a new one."""
    return re.split(r"\r|\n|\x1b\[[0-9;]*[A-Za-z]", text)


# -- progress bars --------------------------------------------------------------------------------------------

def test_no_bar_and_no_output_off_a_terminal(monkeypatch):
    stream = io.StringIO()  # a pipe or a file: isatty() is False
    monkeypatch.setattr(sys, "stderr", stream)
    assert not progress.on_terminal()
    with progress.progress_bar(5, "train") as bar:
        assert bar.disable
        for _ in range(5):
            bar.update()
        bar.set_postfix(loss="0.5")
    assert stream.getvalue() == ""
    assert list(progress.track([1, 2, 3], "predict")) == [1, 2, 3] and stream.getvalue() == ""


def test_no_bar_on_a_terminal_when_turned_off(monkeypatch):
    terminal = as_terminal(monkeypatch)
    with progress.progress_bar(3, "train", enabled=False) as bar:
        bar.update(3)
    assert bar.disable and terminal.getvalue() == ""


def test_a_closed_or_plain_stderr_is_no_terminal(monkeypatch):
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    assert not progress.on_terminal()
    monkeypatch.setattr(sys, "stderr", object())  # no isatty at all
    assert not progress.on_terminal()


def test_log_lines_print_above_a_bar_never_inside_it(monkeypatch):
    terminal = as_terminal(monkeypatch)
    log = logging.getLogger("detkit.train")
    root_handlers = list(logging.getLogger().handlers)
    with progress.progress_bar(4, "train") as bar:
        assert not bar.disable
        bar.update(2)
        log.warning("iteration 2/4: something worth a line")
        bar.update(2)
        progress.write_above_bars("skipping broken.jpg: not an image")
    assert logging.getLogger().handlers == root_handlers  # console logging restored after the bar
    text = terminal.getvalue()
    assert "\r" in text and "train" in text  # the bar was drawn
    lines = _lines(text)
    # each message is a whole line of its own, not glued to a bar's text
    assert "WARNING detkit.train: iteration 2/4: something worth a line" in lines
    assert "skipping broken.jpg: not an image" in lines
    log.warning("after the bar")
    assert terminal.getvalue().endswith("WARNING detkit.train: after the bar\n")


def test_nested_bars_restore_console_logging(monkeypatch):
    terminal = as_terminal(monkeypatch)
    root_handlers = list(logging.getLogger().handlers)
    with progress.progress_bar(2, "train") as outer:
        with progress.progress_bar(3, "eval", leave=False) as inner:
            inner.update(3)
            logging.getLogger("detkit.train").warning("inside both")
        outer.update(2)
    assert logging.getLogger().handlers == root_handlers
    assert "WARNING detkit.train: inside both" in _lines(terminal.getvalue())


def test_synth_draws_a_bar_on_a_terminal_only(tmp_path):
    """The real command: once with stderr on a pseudo-terminal (a fresh one reports no width, as some CI
    terminals do), once with stderr to a pipe."""
    pty = pytest.importorskip("pty")
    command = [sys.executable, "-m", "detkit", "synth", str(tmp_path / "a"), "--train", "3", "--val", "2",
               "--min-size", "48", "--max-size", "64", "--workers", "1"]
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=secondary,
                              timeout=120, cwd=REPO)
        os.close(secondary)
        secondary = None
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if secondary is not None:
            os.close(secondary)
        os.close(primary)
    assert proc.returncode == 0
    shown = shown.decode(errors="replace")
    assert "synth train" in shown and "synth val" in shown and "\r" in shown
    assert b"\r" not in proc.stdout and b"wrote 5 images" in proc.stdout  # the summary goes to stdout

    piped = subprocess.run([*command[:4], str(tmp_path / "b"), *command[5:]], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
    assert piped.returncode == 0 and piped.stderr == ""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("console_data")
    generate(root, {"train": 4, "val": 2}, seed=1, workers=1, min_size=64, max_size=80, max_objects=4)
    return root


def tiny_train_overrides(root, out, iterations: int = 2) -> list[str]:
    """The demo config on `root`, as small as it trains: 2 images a step at 64 px, `iterations` steps."""
    return [f"data.train.annotations={root}/annotations/instances_train.json", f"data.train.images={root}/train",
            f"data.val.annotations={root}/annotations/instances_val.json", f"data.val.images={root}/val",
            "data.batch_size=2", "data.num_workers=0", "data.train_transform.short_sizes=[64]",
            "data.train_transform.max_size=80", "data.test_transform.short_sizes=[64]",
            "data.test_transform.max_size=80", "solver.unit=iterations", f"solver.max_length={iterations}",
            "solver.warmup_iters=1", "runtime.log_period=1", "runtime.channels_last=false", "eval.plots=false",
            f"runtime.output_dir={out}"]


def test_training_into_a_pipe_logs_lines_without_bar_redraws_or_escape_codes(tiny_data, tmp_path):
    command = [sys.executable, "-m", "detkit", "train", str(shipped_config("retinanet-resnet18-fpn-demo.yaml")),
               *tiny_train_overrides(tiny_data, tmp_path / "run")]
    proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for code in BAR_CODES:
        assert code not in proc.stderr and code not in proc.stdout, code
    # without a bar, the periodic log lines say how training goes, one per line
    lines = proc.stderr.splitlines()
    assert any(re.fullmatch(r"INFO detkit\.train: iteration 1/2: loss [\d.]+, lr [\d.e-]+, .* img/s, eta \S+", line)
               for line in lines), proc.stderr
    assert any(line.startswith("INFO detkit.train: iteration 2: bbox/AP ") for line in lines), proc.stderr
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout


def test_benchmark_logs_its_phases_off_a_terminal(caplog, tmp_path, monkeypatch):
    from detkit.engine import environment

    monkeypatch.setattr(environment, "git_dirty", lambda root: None)  # no git process in a shared checkout
    caplog.set_level(logging.INFO, logger="detkit")
    assert main(["benchmark", str(shipped_config("retinanet-resnet18-fpn-demo.yaml")), "--no-train",
                 "--no-inference", "--device", "cpu", "--json", str(tmp_path / "record.json")]) == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "detkit.benchmark"]
    assert "phase 1 of 1: size" in messages
    assert messages.index("phase 1 of 1: size") < next(i for i, m in enumerate(messages) if m.startswith("size: "))


# -- make install ---------------------------------------------------------------------------------------------

def test_make_install_says_what_it_does_before_each_step():
    if shutil.which("make") is None:
        pytest.skip("no make")
    # -n: print the commands only; -B: as if nothing were installed yet
    # without the make that runs the suite (`make test`): its MAKEFLAGS and MAKELEVEL add "make[1]: ..." lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    out = subprocess.run(["make", "-n", "-B", "install", "VENV=/nonexistent/venv"], capture_output=True, text=True,
                         cwd=REPO, timeout=60, check=True, env=env).stdout.splitlines()
    out = [line for line in out if not line.startswith("make[")]
    torch_pin = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    venv = out.index("python3 -m venv /nonexistent/venv")
    torch = next(i for i, line in enumerate(out) if f"pip install -q --disable-pip-version-check torch=={torch_pin}"
                 in line)
    detkit = next(i for i, line in enumerate(out) if "-e '.[dev]'" in line)
    assert out[venv - 1].startswith("echo \"creating the virtual environment /nonexistent/venv")
    assert out[torch - 1].startswith(f"echo \"installing torch {torch_pin} into /nonexistent/venv")
    assert out[detkit - 1].startswith("echo \"installing detkit (editable)")
    assert out[-1].startswith("echo \"done:")


# -- one AP unit, no undefined values -------------------------------------------------------------------------

def _only_small_objects_gt():
    """Two categories; "b" has no ground truth; every object is small (area < 32^2): AP medium/large undefined."""
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2)]
    boxes = {1: [[10, 10, 20, 20], [50, 50, 12, 14]], 2: [[30, 40, 16, 16]]}
    annotations = [{"id": 10 * i + k, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3],
                    "iscrowd": 0} for i, bs in boxes.items() for k, b in enumerate(bs)]
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


@pytest.fixture(scope="module")
def small_result():
    gt = _only_small_objects_gt()
    results = [{"image_id": a["image_id"], "category_id": 1, "bbox": [v + 1 for v in a["bbox"]], "score": 0.9}
               for a in gt["annotations"]]
    return evaluate(gt, results)


def test_undefined_metrics_are_left_out_of_metrics_and_metrics_json(small_result, tmp_path):
    stats = dict(zip(coco_eval.METRIC_NAMES, small_result.stats))
    assert stats["APm"] == stats["APl"] == stats["ARm"] == stats["ARl"] == -1  # what pycocotools reports
    assert 0 < stats["AP"] < 1 and stats["APs"] == stats["AP"]
    assert set(small_result.metrics) == set(coco_eval.METRIC_NAMES) - {"APm", "APl", "ARm", "ARl"}
    save_evaluation({"bbox": small_result}, tmp_path, plots=False)
    text = (tmp_path / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    assert "APl" not in metrics["bbox"] and metrics["bbox"]["AP"] == pytest.approx(stats["AP"])
    assert metrics["bbox"]["per_category"] == {"a": {k: pytest.approx(v) for k, v in
                                                     small_result.per_category["a"].items()}, "b": {}}

    def values(tree):
        for v in tree.values():
            yield from values(v) if isinstance(v, dict) else [v]

    assert all(v >= 0 for v in values(metrics["bbox"]))


def test_the_per_category_table_prints_fractions_and_a_dash_for_undefined(small_result):
    table = small_result.per_category_table().splitlines()
    assert table[0] == "category |    AP |  AP50 |  AP75"
    ap = small_result.per_category["a"]
    assert table[2] == f"a        | {ap['AP']:.3f} | {ap['AP50']:.3f} | {ap['AP75']:.3f}"
    assert table[3] == "b        |     - |     - |     -"
    # the same figure as the 12-line block prints
    block_ap = small_result.summary.splitlines()[0].rsplit("= ", 1)[1]
    assert f"{small_result.stats[0]:.3f}" == block_ap


def _figure_of(plot, result, tmp_path, monkeypatch):
    figures = []
    real_save = coco_eval._save
    monkeypatch.setattr(coco_eval, "_save", lambda fig, path: (figures.append(fig), real_save(fig, path))[1])
    plot(result, tmp_path / "plot.png")
    (fig,) = figures
    fig.canvas.draw()
    return fig


def test_plots_label_ap_as_a_fraction(small_result, tmp_path, monkeypatch):
    fig = _figure_of(coco_eval.plot_per_category, small_result, tmp_path, monkeypatch)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "AP (IoU=0.50:0.95)" and ax.get_xlim()[1] < 2
    assert f"(mean {small_result.stats[0]:.3f})" in ax.get_title()
    assert [t.get_text() for t in ax.texts] == [f"{small_result.per_category['a']['AP']:.3f}"]

    fig = _figure_of(coco_eval.plot_precision_recall, small_result, tmp_path, monkeypatch)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[2] == f"IoU=0.50:0.95 (AP {small_result.stats[0]:.3f})"


def test_the_precision_recall_legend_covers_no_curve(tmp_path, monkeypatch):
    gt = _only_small_objects_gt()
    rng = np.random.default_rng(0)
    results = [{"image_id": a["image_id"], "category_id": 1, "score": float(rng.random()),
                "bbox": [v + float(rng.normal(0, 2)) for v in a["bbox"]]} for a in gt["annotations"]]
    fig = _figure_of(coco_eval.plot_precision_recall, evaluate(gt, results), tmp_path, monkeypatch)
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent())  # outside the axes: no curve can be under it
    assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)  # not cut off


def test_the_metrics_log_has_no_nan(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(3, {"bbox/AP": 0.25, "bbox/APl": math.nan, "loss": math.inf})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"iteration": 3, "bbox/AP": 0.25}


def test_the_model_zoo_gives_ap_as_a_fraction():
    assert "box AP" in COLUMNS and "mask AP" in COLUMNS and not any("%" in c for c in COLUMNS)
    page = (REPO / "docs" / "MODEL_ZOO.md").read_text()
    assert "| box AP | mask AP |" in page and "AP (%)" not in page
    measured = re.findall(r"\| (\d+\.\d+) \| (?:-|\d+\.\d+) \| \[", page)  # the box AP cell of a row with AP
    assert measured and all(0 <= float(ap) <= 1 for ap in measured)


# -- synth's defaults ------------------------------------------------------------------------------------------

def test_synth_defaults_are_the_demo_dataset():
    args = build_parser().parse_args(["synth", "somewhere"])
    assert (args.train, args.val) == (DEMO_SPLITS["train"], DEMO_SPLITS["val"])
    assert (args.min_size, args.max_size) == DEMO_IMAGE_SIZES
    assert (args.seed, args.max_objects) == (0, 8)
