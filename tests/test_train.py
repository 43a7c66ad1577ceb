"""The train stage: loss, mining masks, recall@k, the split (plain functions), and real Ray Train runs: a worker
killed mid-training, resumption on resubmission, learning a hidden factor, and finetuning with checkpoints on S3."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from artsim.config import config_from_dict
from artsim.errors import ArtsimError
from artsim.runtime import RunContext
from artsim.rundir.schema import records_table
from artsim.train.data import PackedImages, epoch_batches, held_out_mask, prepare_training_data
from artsim.train.evaluate import chance_recall_at_k, recall_at_k, relevance_from_labels
from artsim.train.losses import positive_pair_keys, triplet_loss, valid_negative_mask
from artsim.train.models import HeadModel, head_description
from artsim.testing.synthetic import SyntheticSpec, synthetic_records


def unit(rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# Plain functions


def test_triplet_loss_on_cosine_distance():
    emb = unit([[1, 0], [1, 0.1], [0, 1], [-1, 0]])  # 0 anchor, 1 near, 2 orthogonal, 3 opposite
    a, p = torch.tensor([0]), torch.tensor([1])
    d_ap = 1 - float(emb[0] @ emb[1])
    loss, stats = triplet_loss(emb, a, p, torch.tensor([2]), margin=0.2)
    assert float(loss) == pytest.approx(0.0)  # d(a,n) = 1 >> d(a,p) + 0.2
    loss, _ = triplet_loss(emb, a, p, torch.tensor([1]), margin=0.2)  # negative == positive: exactly the margin
    assert float(loss) == pytest.approx(0.2, abs=1e-6)
    swapped, stats = triplet_loss(emb, a, torch.tensor([2]), torch.tensor([1]), margin=0.2)
    assert float(swapped) == pytest.approx(1.0 - d_ap + 0.2, abs=1e-5) and stats["active"] == 1.0


def test_batch_hard_and_semi_hard_pick_the_right_negatives():
    # anchor 0, positive 1 (distance ~0.1), candidates: 2 (closer than the positive), 3 (just beyond), 4 (far),
    # and 5, which is closest of all but known to be similar to the anchor (so never a negative).
    emb = unit([[1, 0], [0.9, 0.436], [0.99, 0.14], [0.8, 0.6], [0, 1], [1, 0.01]])
    a, p, n = torch.tensor([0]), torch.tensor([1]), torch.tensor([4])
    valid = torch.tensor([[False, False, True, True, True, False]])
    d = 1 - emb[0] @ emb.T
    none, _ = triplet_loss(emb, a, p, n, 0.2)
    hard, _ = triplet_loss(emb, a, p, n, 0.2, "batch_hard", valid)
    semi, _ = triplet_loss(emb, a, p, n, 0.2, "semi_hard", valid)
    d_ap = float(d[1])
    assert float(hard) == pytest.approx(max(0.0, d_ap - float(d[2]) + 0.2), abs=1e-5)  # object 2, not 5
    assert float(semi) == pytest.approx(max(0.0, d_ap - float(d[3]) + 0.2), abs=1e-5)  # farther than p: object 3
    assert float(none) == pytest.approx(max(0.0, d_ap - float(d[4]) + 0.2), abs=1e-5)
    assert float(hard) > float(semi) > float(none) >= 0


def test_valid_negative_mask_excludes_anchor_positive_and_known_similar():
    keys = positive_pair_keys(np.array([0, 2]), np.array([1, 0]), 10)  # 0~1 and 0~2 are similar
    mask = valid_negative_mask(np.array([0, 3]), np.array([1, 4]), np.array([0, 1, 2, 3, 4, 5]), keys, 10)
    assert mask.tolist() == [[False, False, False, True, True, True],  # anchor 0: not itself, not 1 nor 2
                             [True, True, True, False, False, True]]  # anchor 3: not itself, not its positive 4


def test_recall_at_k_by_hand():
    vecs = unit([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99], [-1, 0]]).numpy()
    assert relevance_from_labels([["a"], ["a"], ["b"], ["b", "a"], []]) == [{1, 3}, {0, 3}, {3}, {0, 1, 2}, set()]
    rel = [{1, 2}, {0}, {3}, {2}, set()]
    # nearest first: 0 -> 1, 3, 2; 1 -> 0, 3; 2 -> 3, 1; 3 -> 2, 1. Item 4 has nothing relevant: skipped.
    assert recall_at_k(vecs, rel, k=1) == {"recall": 1.0, "queries": 4, "k": 1}
    # k=2: query 0 finds 1 of its 2 relevant items in {1, 3}; the others find their single one.
    assert recall_at_k(vecs, rel, k=2)["recall"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert chance_recall_at_k(rel, 1) == pytest.approx(np.mean([1 / 4 * 2 / 1, 1 / 4, 1 / 4, 1 / 4]))


def test_split_is_deterministic_and_training_never_sees_held_out_objects():
    ids = [f"c:{i}" for i in range(1000)]
    mask = held_out_mask(ids, 0.2, seed=7)
    assert 150 < mask.sum() < 250 and (mask == held_out_mask(ids, 0.2, seed=7)).all()
    assert (mask != held_out_mask(ids, 0.2, seed=8)).any()
    rng = np.random.default_rng(0)
    a, p, n = (rng.choice(ids, 3000).tolist() for _ in range(3))
    reasons = [f"shared subject: s{i % 7}" for i in range(3000)]
    data = prepare_training_data(a, p, n, reasons, available=set(ids[:900]), validation_fraction=0.2, seed=7)
    held = held_out_mask(data.object_ids, 0.2, 7)
    assert not held[data.anchors].any() and not held[data.positives].any() and not held[data.negatives].any()
    assert held[data.val_objects].all() and len(data.val_relevance) == len(data.val_objects)
    assert data.stats["unavailable"] > 0 and all(o in set(ids[:900]) for o in data.object_ids)
    with pytest.raises(ArtsimError, match="no triplet"):
        prepare_training_data(["x"], ["y"], ["z"], ["r"], available=set())


def test_epoch_batches_give_every_worker_the_same_number_of_steps():
    sizes = []
    for rank in range(3):
        batches = epoch_batches(1001, 64, epoch=2, seed=0, rank=rank, world=3)
        sizes.append([len(b) for b in batches])
    assert sizes[0] == sizes[1] == sizes[2] and sum(sizes[0]) == 1001 // 3
    all_items = np.concatenate([np.concatenate(epoch_batches(1001, 64, 2, 0, r, 3)) for r in range(3)])
    assert len(set(all_items.tolist())) == len(all_items)  # no triplet on two workers
    assert not np.array_equal(np.concatenate(epoch_batches(1001, 64, 3, 0, 0, 3)),
                              np.concatenate(epoch_batches(1001, 64, 2, 0, 0, 3)))


def test_packed_images_round_trip_and_survive_ray_serialisation(ray_session):
    import ray

    images = [b"", b"\xff\xd8jpeg", bytes(range(256)) * 3, b"x"]
    packed = PackedImages.pack(images)
    assert len(packed) == 4 and [packed[i] for i in range(4)] == images
    assert packed.nbytes == sum(map(len, images)) + 5 * 8
    back = ray.get(ray.put({"images": packed}))["images"]  # what a finetune worker gets
    assert [back[i] for i in range(4)] == images
    assert len(PackedImages.pack([])) == 0


def test_bias_free_heads_do_not_care_about_input_scale():
    # The embed stage feeds raw backbone features to the head; training used L2-normalised ones.
    torch.manual_seed(0)
    for hidden in ([], [32]):
        for center in (False, True):
            model = HeadModel(head_description(16, 8, hidden, center=center))
            if center:
                model.head.mean.copy_(torch.randn(16) * 0.1)
            x = torch.randn(5, 16) * 7.3
            torch.testing.assert_close(model(x), model(x / x.norm(dim=1, keepdim=True)))


def test_centered_head_removes_the_common_component():
    """Features that share a large common component (cosine ~0.99) are spread out once the mean is removed."""
    torch.manual_seed(0)
    common = torch.randn(64)
    x = torch.nn.functional.normalize(common + 0.1 * torch.randn(50, 64), dim=1)
    model = HeadModel(head_description(64, 64, [], center=True))
    torch.nn.init.eye_(model.head.layers[0].weight)
    before = (x @ x.T)[~torch.eye(50, dtype=bool)].mean()
    model.head.mean.copy_(x.mean(dim=0))
    y = model(x)
    after = (y @ y.T)[~torch.eye(50, dtype=bool)].mean()
    assert before > 0.95 and abs(after) < 0.1, (before, after)


# ---------------------------------------------------------------------------------------------------------------
# Ray Train runs

D = 512  # resnet18's feature size: head mode checks the embeddings against the embed section's backbone


def factor_embeddings(records, seed=0, subject_scale=0.35):
    """Stand-ins for backbone embeddings in which creator and object type dominate and the subject (the factor a
    curator cares about) is a weak signal under noise."""
    rng = np.random.default_rng(seed)
    directions = {}

    def direction(key):
        if key not in directions:
            directions[key] = rng.normal(size=D) / np.sqrt(D)
        return directions[key]

    e = np.stack([direction(r["creator"]) + direction(r["object_type"]) + subject_scale * direction(r["subjects"][0])
                  + 0.6 * rng.normal(size=D) / np.sqrt(D) for r in records]).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def write_embeddings(ctx, records, vectors, key="resnet18"):
    ctx.storage.write_table(pa.table({
        "object_id": [r["object_id"] for r in records],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
        "model": [key] * len(records)}), ctx.paths.embeddings(key))


class TrainWorkerKiller(threading.Thread):
    """Kills one Ray Train worker process with SIGKILL (as the OOM killer or a lost node would) as soon as the run
    directory holds a checkpoint of ``after_epoch``: a real failure, from outside the product."""

    def __init__(self, model_dir, after_epoch: int, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.model_dir, self.after_epoch, self.timeout_s = model_dir, after_epoch, timeout_s
        self.killed_pid = None
        self.seen: dict = {}  # what the kill saw, for the assertion messages
        self.done = threading.Event()

    def _checkpoint_epoch(self) -> int:
        """The newest epoch whose checkpoint Ray Train's controller has *registered* (its snapshot file), not merely
        one a worker has written: a worker killed before the controller collected a checkpoint restarts from an
        older one, or from scratch (seen: killed 0.6 s after writing epoch 2, the run started over at epoch 1)."""
        try:
            snapshot = json.loads((self.model_dir / "checkpoint_manager_snapshot.json").read_text())
            return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
        except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being written
            return 0

    def run(self):
        deadline = time.monotonic() + self.timeout_s
        # Train workers of an earlier run in this Ray already carry the title; this run's may be new processes or
        # idle workers Ray started earlier and now reuses for the actor, so "titled now, not before" is the test
        # (a start-time filter missed reused workers)
        earlier = set(train_worker_pids())
        while not self.done.is_set() and time.monotonic() < deadline:
            if self._checkpoint_epoch() >= self.after_epoch:
                pids = [p for p in train_worker_pids() if p not in earlier]
                if pids:
                    os.kill(max(pids), signal.SIGKILL)
                    self.killed_pid = max(pids)
                    self.seen = {"checkpoint_epoch": self._checkpoint_epoch(), "candidates": pids,
                                 "titles": {p: Path(f"/proc/{p}/cmdline").read_bytes()[:60] for p in pids
                                            if Path(f"/proc/{p}").exists()}}
                    return
            self.done.wait(0.02)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the field after the state letter


def _descends_from_this_process(pid: int) -> bool:
    """True when this test process started ``pid`` (through the local Ray's raylet): other Ray instances on the
    machine are not ours to kill."""
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        pid = _parent(pid)
    return False


def train_worker_pids() -> list[int]:
    """Processes of this test's Ray whose title Ray set to a Ray Train worker (``ray::RayTrainWorker...``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if ((proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker")
                        and _descends_from_this_process(int(proc.name))):
                    pids.append(int(proc.name))
            except (OSError, ValueError):
                continue
    return pids


def _head_run_setup(root, epochs: int, batch_size: int):
    records = synthetic_records(SyntheticSpec(n=400, seed=5, n_creators=8, n_subjects=6))
    tree = {"run": {"root": str(root)}, "embed": {"model": "resnet18"},
            "mine": {"num_triplets": 4000, "strategies": {"shared_terms": 1}, "term_fields": ["subjects"]},
            "train": {"epochs": epochs, "num_workers": 2, "head_dim": 64, "batch_size": batch_size,
                      "learning_rate": 0.01, "mining": "semi_hard", "head_type": "projection",
                      "select_by": "criteria"}}
    ctx = RunContext(config_from_dict(tree))
    vectors = factor_embeddings(records)
    ctx.storage.write_table(records_table(records), ctx.paths.records)
    write_embeddings(ctx, records, vectors)
    return ctx, tree, records, vectors


@pytest.fixture(scope="module")
def head_run(ray_session, tmp_path_factory):
    """One head-mode run (3 epochs)."""
    from artsim.mine.stage import run_mine
    from artsim.train.stage import run_train

    ctx, tree, records, vectors = _head_run_setup(tmp_path_factory.mktemp("head_run"), epochs=3, batch_size=64)
    run_mine(ctx)
    summary = run_train(ctx)
    return {"ctx": ctx, "tree": tree, "summary": summary, "records": records, "vectors": vectors}


@pytest.fixture(scope="module")
def killed_run(ray_session, tmp_path_factory):
    """A head-mode run of 8 epochs, one of whose two workers is killed (SIGKILL) once Ray Train has registered the
    epoch-2 checkpoint; epochs of ~0.5 s (small batches) leave the kill seconds before the last report."""
    from artsim.mine.stage import run_mine
    from artsim.train.stage import run_train

    root = tmp_path_factory.mktemp("killed_run")
    ctx, tree, _, _ = _head_run_setup(root, epochs=8, batch_size=8)
    run_mine(ctx)
    killer = TrainWorkerKiller(root / "models" / "similarity", after_epoch=2)
    killer.start()
    try:
        summary = run_train(ctx)
    finally:
        killer.done.set()
        killer.join()
    return {"ctx": ctx, "summary": summary, "killed_pid": killer.killed_pid, "seen": killer.seen}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_worker_killed_mid_training_resumes_from_last_checkpoint(killed_run):
    summary, ctx = killed_run["summary"], killed_run["ctx"]
    assert killed_run["killed_pid"] is not None  # a live training worker really died
    # One restart, from the checkpoint Ray Train had registered when the worker died (epoch 2, or a later one it
    # registered before noticing the death), not from scratch; then every remaining epoch ran once.
    starts = [s["start_epoch"] for s in summary["sessions"]]
    seen = killed_run["seen"]
    assert summary["restarts"] == 1 and starts[0] == 1 and seen["checkpoint_epoch"] + 1 <= starts[1] <= 8, \
        (starts, seen)
    assert summary["epochs"] == 8
    history = json.loads(ctx.storage.read_text(f"{ctx.paths.model('similarity')}/history.json"))["history"]
    assert [h["epoch"] for h in history] == list(range(9))  # each epoch once: nothing redone, nothing lost
    assert ctx.storage.read_bytes(f"{ctx.paths.model('similarity')}/recall.png").startswith(b"\x89PNG")


def test_training_learns_the_hidden_factor(head_run):
    """recall@10 of same-subject works, over the whole collection, with the exported model vs. untrained."""
    from artsim.models.artifact import load_artifact
    from artsim.models.embedder import build_embedder

    ctx, records, vectors = head_run["ctx"], head_run["records"], head_run["vectors"]
    export = ctx.paths.model_export("similarity")
    spec, backbone_state, head_state, _ = load_artifact(ctx.storage, export)
    assert backbone_state is None and spec.output_dim == 64 and spec.backbone == "resnet18"
    embedder = build_embedder(config_from_dict({"embed": {"model": "resnet18", "weights": export}}).embed,
                              ctx.storage)
    with torch.no_grad():
        trained = torch.nn.functional.normalize(embedder.head(torch.from_numpy(vectors)), dim=1).numpy()
    relevant = relevance_from_labels([r["subjects"] for r in records])
    before = recall_at_k(vectors, relevant, 10)["recall"]
    after = recall_at_k(trained, relevant, 10)["recall"]
    chance = chance_recall_at_k(relevant, 10)
    assert after > before + 0.3 and after > 0.8, (before, after, chance)
    # The untrained embedding groups by creator and object type instead (the subject is a weak signal in it).
    by_creator = relevance_from_labels([[r["creator"]] for r in records])
    assert recall_at_k(vectors, by_creator, 10)["recall"] > before
    s = head_run["summary"]
    assert s["val_recall@10"] > s["val_recall@10_untrained"] + 0.3


def test_head_mode_projects_the_collection_like_embed_with_the_export(head_run):
    """train (head mode) writes embeddings/<model_key of the export>/: what `embed` with embed.weights=<export>
    would write -- same directory name, weights_id and vectors (checked against the export's own head)."""
    from artsim.models.embedder import build_embedder
    from artsim.rundir.names import model_key
    from artsim.rundir.embeddings import load_embedding_matrix

    ctx, records, vectors = head_run["ctx"], head_run["records"], head_run["vectors"]
    export = ctx.paths.model_export("similarity")
    embed_cfg = config_from_dict({"embed": {"model": "resnet18", "weights": export}}).embed
    key = model_key(embed_cfg)
    assert key == "resnet18-similarity"
    assert head_run["summary"]["projected_embeddings"] == ctx.paths.embeddings(key)
    ids, projected = load_embedding_matrix(ctx.storage, ctx.paths.embeddings(key))
    assert ids == [r["object_id"] for r in records] and projected.shape == (len(records), 64)
    embedder = build_embedder(embed_cfg, ctx.storage)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(embedder.head(torch.from_numpy(vectors)), dim=1).numpy()
    np.testing.assert_allclose(projected, expected, atol=1e-5)
    info = json.loads(ctx.storage.read_text(f"{ctx.paths.embeddings(key)}/_model.json"))
    assert info["weights_id"] == embedder.weights_id and info["weights"] == export and info["output_dim"] == 64


def test_resubmitting_the_same_run_name_resumes(head_run):
    from artsim.train.stage import run_train

    tree = json.loads(json.dumps(head_run["tree"]))
    tree["train"]["epochs"] = 4
    summary = run_train(RunContext(config_from_dict(tree)))
    assert [s["start_epoch"] for s in summary["sessions"]] == [1, 4]  # picked up after epoch 3
    assert summary["epochs"] == 4 and [h["epoch"] for h in json.loads(head_run["ctx"].storage.read_text(
        f"{head_run['ctx'].paths.model('similarity')}/history.json"))["history"]] == [0, 1, 2, 3, 4]


def test_finetune_on_images_with_checkpoints_on_s3(ray_session, s3_endpoint):
    import boto3

    from artsim.models.embedder import build_embedder
    from artsim.rundir.schema import IMAGES_SCHEMA
    from artsim.mine.stage import run_mine
    from artsim.train.stage import run_train
    from artsim.testing.synthetic import encode_jpeg, render_image

    spec = SyntheticSpec(n=48, seed=2, n_creators=3, n_subjects=3, image_size=64)
    records = synthetic_records(spec)
    root = f"s3://artsim-test/train-{np.random.default_rng().integers(1 << 30)}"
    ctx = RunContext(config_from_dict({
        "run": {"root": root}, "storage": {"s3_endpoint_url": s3_endpoint},
        "embed": {"model": "shufflenet_v2_x0_5", "image_size": 64},
        "mine": {"num_triplets": 300, "strategies": {"shared_terms": 1}, "term_fields": ["subjects"]},
        "train": {"mode": "finetune", "epochs": 2, "num_workers": 1, "cpus_per_worker": 2, "batch_size": 32,
                  "head_dim": 32, "learning_rate": 0.003, "name": "ft", "head_type": "projection",
                  # no validation set: nothing to pick an epoch by, so the last (trained) epoch is exported
                  "validation_fraction": 0.0}}))
    images = [encode_jpeg(render_image(r, spec), 90) for r in records]
    rows = [{"object_id": r["object_id"], "status": "ok", "http_status": 200, "error": None, "url_final": None,
             "width": 64, "height": 64, "sha256": None, "image": b} for r, b in zip(records, images)]
    rows[0] = dict(rows[0], image=b"not an image")  # a bad image is left out, not a crash
    ctx.storage.write_table(records_table(records), ctx.paths.records)
    ctx.storage.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), ctx.paths.images)
    run_mine(ctx)
    summary = run_train(ctx)
    assert summary["epochs"] == 2 and summary["mode"] == "finetune"
    assert summary["exported_epoch"] == 2 and "no validation set" in summary["verdict"]
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket="artsim-test", Prefix=root[len("s3://artsim-test/"):] + "/models/ft/")["Contents"]]
    assert any("/checkpoint_" in k and k.endswith("model.safetensors") for k in keys)
    assert any(k.endswith("export/artifact.json") for k in keys) and any(k.endswith("recall.png") for k in keys)
    # The export is what embed.weights accepts: a finetuned backbone + head that embeds images.
    embedder = build_embedder(config_from_dict({"embed": {"model": "shufflenet_v2_x0_5", "weights": summary["export"]}}).embed,
                              ctx.storage)
    assert embedder.spec.includes_backbone_weights and embedder.spec.output_dim == 32
    out = embedder.embed_bytes(images[1:4])
    assert out.shape == (3, 32) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-4)
    before = build_embedder(config_from_dict({"embed": {"model": "shufflenet_v2_x0_5", "image_size": 64}}).embed)
    assert not np.allclose(before.backbone.conv1[0].weight.numpy(), embedder.backbone.conv1[0].weight.numpy())


def test_train_without_inputs_is_a_clear_error(tmp_path):
    from artsim.train.stage import run_train

    ctx = RunContext(config_from_dict({"run": {"root": str(tmp_path)}, "embed": {"model": "resnet18"}}))
    with pytest.raises(ArtsimError, match="triplets"):
        run_train(ctx)


def test_finetune_reads_only_the_ok_images_the_triplets_name(tmp_path):
    from artsim.rundir.schema import IMAGES_SCHEMA
    from artsim.train.stage import _read_images
    from artsim.storage import Storage

    storage = Storage()
    rows = [{"object_id": f"c:{i}", "status": "ok" if i % 3 else "not_found", "http_status": 200, "error": None,
             "url_final": None, "width": 1, "height": 1, "sha256": None, "image": b"img%d" % i if i % 3 else None}
            for i in range(600)]
    storage.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), str(tmp_path / "images"), rows_per_file=250)
    needed = {"c:1", "c:3", "c:599", "c:500", "x:9"}  # c:3 failed to download, x:9 does not exist
    assert _read_images(storage, str(tmp_path / "images"), needed) == {"c:1": b"img1", "c:599": b"img599",
                                                                      "c:500": b"img500"}


def test_resuming_a_run_trained_with_other_settings_fails_before_any_worker_starts(head_run):
    """Same train.name, another head: a one-line config error from the driver, not a worker failure that Ray Train
    restarts max_failures times (a second `make demo` after an upgrade met exactly that)."""
    from artsim.errors import ConfigError
    from artsim.train.stage import run_train

    tree = json.loads(json.dumps(head_run["tree"]))
    tree["train"]["head_dim"] = 16
    model_uri = head_run["ctx"].paths.model("similarity")
    before = sorted(head_run["ctx"].storage.list(model_uri))
    with pytest.raises(ConfigError, match=r"^train\.name: the checkpoints of run 'similarity' .* other settings"):
        run_train(RunContext(config_from_dict(tree)))
    assert sorted(head_run["ctx"].storage.list(model_uri)) == before  # nothing started, nothing written


def test_preserve_neighbourhoods_trains_through_ray_train(ray_session, tmp_path):
    """train.preserve_neighbourhoods > 0 runs the frozen start model beside the trained one in the Ray Train
    workers; the trained one keeps its graph (the start model's no_grad once covered both: every step failed)."""
    from artsim.mine.stage import run_mine
    from artsim.train.stage import run_train

    _, tree, _, _ = _head_run_setup(tmp_path, epochs=1, batch_size=64)
    tree["train"]["preserve_neighbourhoods"] = 1.0
    ctx = RunContext(config_from_dict(tree))
    run_mine(ctx)
    summary = run_train(ctx)
    assert summary["epochs"] == 1 and summary["restarts"] == 0
    history = json.loads(ctx.storage.read_text(f"{ctx.paths.model('similarity')}/history.json"))["history"]
    assert history[-1]["epoch"] == 1 and history[-1]["train_loss"] > 0
