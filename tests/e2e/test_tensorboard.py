"""`hfgan train --tensorboard DIR` (embedded) writes TensorBoard event files: read back with tensorboard's own event
reader, they hold the scalars and the sample grid of every cluster for every round, and the final utility. The same
run's directory is then served by `hfgan dashboard --run-dir` (the embedded mode's dashboard: its ledger lives in
the training process, the page reads the run directory)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from hfgan_core.cli import main
from hfgan_core.evaluation import MetricsLog
from hfgan_core.runtime.dashboard import Source, make_server

pytestmark = pytest.mark.slow

ROUNDS = 3
CONFIG = f"""
[scenario]
name = "tb"
synthetic_train_per_class = 50
[[scenario.domains]]
dataset = "synthetic"
clients = 4
samples_per_client = 64

[train]
rounds = {ROUNDS}
local_epochs = 1
steps_per_epoch = 2
batch_size = 16
kld_from_round = 2
clusters = 2
score_samples = 100
utility_samples = 100
utility_epochs = 1
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb")
    config = tmp / "tb.toml"
    config.write_text(CONFIG)
    mp = pytest.MonkeyPatch()
    mp.setenv("HFGAN_CLASSIFIER_DIR", str(tmp / "classifiers"))
    mp.delenv("HFGAN_TENSORBOARD_DIR", raising=False)
    try:
        code = main(
            [
                "train",
                "--config",
                str(config),
                "--data-dir",
                str(tmp / "data"),
                "--run-dir",
                str(tmp / "run"),
                "--tensorboard",
                str(tmp / "tb"),
                "--threads",
                "1",
                "--quiet",
            ]
        )
    finally:
        mp.undo()
    assert code == 0
    return tmp


def test_every_round_has_its_scalars_and_sample_grids(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    records = MetricsLog.read(run / "run" / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    every_round = [
        "score/synthetic",
        "loss/all/g_loss",
        "loss/all/d_loss_real",
        "loss/all/d_loss_fake",
        "loss/synthetic/g_loss",
        "time/round_wall_s",
        "time/step_s_mean",
        "latency/modelled_iteration_s",
        "traffic/bytes_sent",
        "clients/arrived",
    ]
    for tag in every_round:
        assert tag in tags["scalars"], (tag, tags["scalars"])
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, ROUNDS + 1)), tag
    # The values are the run's: the metrics.jsonl record of each round, and bytes that only grow.
    for rec, ev in zip(records, acc.Scalars("loss/all/g_loss")):
        assert ev.value == pytest.approx(rec["train"]["g_loss"], rel=1e-6)
    for rec, ev in zip(records, acc.Scalars("time/round_wall_s")):
        assert ev.value == pytest.approx(rec["wall_s"], rel=1e-6)
    sent = [e.value for e in acc.Scalars("traffic/bytes_sent")]
    assert sent == sorted(sent) and sent[0] > 0
    summary = json.loads((run / "run" / "summary.json").read_text())
    # The run's total also counts what was sent after the last round was recorded (the run_end messages).
    assert 0 <= summary["bytes_sent"] - sent[-1] < 1e-4 * summary["bytes_sent"]
    # Sample grids: one image per cluster and round, the PNG the run directory holds for it.
    for rec in records:
        for k in set(rec["clusters"].values()):
            tag = f"samples/cluster_{k}"
            assert tag in tags["images"], (tag, tags["images"])
            images = {e.step: e for e in acc.Images(tag)}
            assert rec["round"] in images, (tag, rec["round"])
            png = run / "run" / "samples" / f"round_{rec['round']:03d}_cluster_{k}.png"
            assert png.is_file()
            assert images[rec["round"]].encoded_image_string.startswith(b"\x89PNG")
    # The final evaluation: utility metrics of each domain at the last round.
    for k in ("accuracy", "f1"):
        events = acc.Scalars(f"utility/synthetic/{k}")
        assert [e.step for e in events] == [ROUNDS]
        assert events[0].value == pytest.approx(summary["domains"]["synthetic"]["utility"][k], rel=1e-6)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_the_dashboard_serves_a_finished_embedded_run_from_its_directory(run):
    import threading

    server = make_server(Source(None, run / "run"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, body = get(base + "/api/state")
        assert code == 200
        state = json.loads(body)
        assert (state["round"], state["rounds"], state["phase"], state["status"]) == (
            ROUNDS,
            ROUNDS,
            "done",
            "finished",
        )
        assert [c["client"] for c in state["clients"]] == [0, 1, 2, 3]
        assert all(c["state"] == "arrived" and c["step_s"] > 0 for c in state["clients"])
        assert [len(state["scores"]["synthetic"])] == [ROUNDS]
        assert {s["round"] for s in state["samples"]} == {ROUNDS}
        code, png = get(base + "/" + state["samples"][0]["url"])
        assert code == 200 and png.startswith(b"\x89PNG")
        code, page = get(base + "/")
        assert code == 200 and b'<table id="clients">' in page
        # Nothing but samples/*.png is served from the run directory.
        for path in ("/samples/../summary.json", "/samples/..%2Fsummary.json", "/summary.json", "/samples/x.png"):
            assert get(base + path)[0] == 404, path
        req = urllib.request.Request(base + "/api/state", method="POST", data=b"{}")
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("POST accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 501
    finally:
        server.shutdown()
        server.server_close()
