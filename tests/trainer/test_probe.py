"""Linear probe, weighted kNN, PCA and the results table against independent computations (scikit-learn, direct
loops, the seed's table format)."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from trainer.evaluation.pca import PCA_PROBE, pca_features
from trainer.evaluation.probe import KNNOptions, ProbeOptions, knn_classify, knn_scores, linear_probe
from trainer.evaluation.report import markdown_table, result_row


@pytest.fixture(scope="module")
def digits_split():
    x, y = load_digits(return_X_y=True)
    return train_test_split(x.astype(np.float32), y, test_size=0.3, stratify=y, random_state=0)


def test_linear_probe_separable_blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 4
    labels = torch.randint(5, (600,), generator=g)
    x = centers[labels] + torch.randn(600, 32, generator=g)
    out = linear_probe(x[:400], labels[:400], x[400:], labels[400:], seed=0)
    assert out["top1"] >= 0.9 and "weight_decay" in out and "top5" in out


def test_linear_probe_close_to_sklearn_on_digits(digits_split):
    x_tr, x_te, y_tr, y_te = digits_split
    ours = linear_probe(x_tr, y_tr, x_te, y_te, seed=0)["top1"]
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    reference = LogisticRegression(max_iter=2000).fit((x_tr - mean) / std, y_tr).score((x_te - mean) / std, y_te)
    assert ours == pytest.approx(reference, abs=0.03)
    assert ours > 0.93


def test_minibatch_solver_reaches_the_lbfgs_optimum_on_digits(digits_split):
    """The streamed Adam solver (for sets too large for L-BFGS) fits the same objective as L-BFGS: at one weight
    decay the two classifiers agree within a few test images, and the streamed fit is deterministic given the seed."""
    x_tr, x_te, y_tr, y_te = digits_split
    exact = linear_probe(x_tr, y_tr, x_te, y_te, ProbeOptions(weight_decays=(1e-2,), solver="lbfgs"), device="cpu")
    options = ProbeOptions(weight_decays=(1e-2,), solver="minibatch", epochs=40, batch_size=256, lr=3e-2)
    streamed = linear_probe(x_tr, y_tr, x_te, y_te, options, device="cpu")
    assert exact["solver"] == "lbfgs" and streamed["solver"] == "minibatch"
    assert streamed["top1"] == pytest.approx(exact["top1"], abs=0.015)
    assert linear_probe(x_tr, y_tr, x_te, y_te, options, device="cpu") == streamed
    with pytest.raises(ValueError, match="solver"):
        linear_probe(x_tr, y_tr, x_te, y_te, ProbeOptions(solver="sgd"))


def brute_force_knn(train_x, train_y, test_x, k, temperature, num_classes, center=True):
    """Direct loops: (centered) cosine similarity, top-k neighbours, votes exp(sim / T) summed per class."""
    mean = train_x.mean(0) if center else np.zeros(train_x.shape[1])
    tx = (train_x - mean) / np.linalg.norm(train_x - mean, axis=1, keepdims=True)
    qx = (test_x - mean) / np.linalg.norm(test_x - mean, axis=1, keepdims=True)
    predictions = []
    for q in qx:
        sims = tx @ q
        neighbours = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in neighbours:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


@pytest.mark.parametrize("center", [True, False])
def test_knn_equals_brute_force(digits_split, center):
    x_tr, x_te, y_tr, y_te = digits_split
    x_tr, y_tr, x_te, y_te = x_tr[:300].astype(np.float64), y_tr[:300], x_te[:80].astype(np.float64), y_te[:80]
    expected = brute_force_knn(x_tr, y_tr, x_te, k=20, temperature=0.1, num_classes=10, center=center)
    scores = knn_scores(torch.from_numpy(x_tr).float(), torch.from_numpy(y_tr), torch.from_numpy(x_te).float(),
                        KNNOptions(k=20, temperature=0.1, center=center), num_classes=10)
    assert (scores.argmax(1).numpy() == expected).mean() >= 0.99  # float32 vs float64 near-ties at most
    out = knn_classify(x_tr, y_tr, x_te, y_te, KNNOptions(k=20, temperature=0.1, center=center, chunk_size=7))
    assert out["top1"] == pytest.approx((expected == y_te).mean(), abs=1 / 80 + 1e-9)


def test_knn_votes_neither_underflow_nor_overflow_at_small_temperatures():
    """Neighbours at cosine ~0.45 of the query: exp((0.45 - 1) / 0.005) underflows float32 to 0 and
    exp(0.45 / 0.005) overflows it; votes relative to the nearest neighbour stay finite and non-zero."""
    bank = torch.tensor([[1.0, 2.0], [1.0, 1.9], [-1.0, 2.0]])
    query = torch.tensor([[1.0, 0.0]])
    for temperature in (0.005, 0.001):
        votes = knn_scores(bank, torch.tensor([0, 1, 1]), query, KNNOptions(k=3, temperature=temperature, center=False))
        assert torch.isfinite(votes).all() and votes[0, 1] > 0 and votes[0].argmax() == 1  # [1, 1.9] is nearest


def test_centered_knn_ignores_a_constant_offset_plain_does_not(digits_split):
    x_tr, x_te, y_tr, y_te = digits_split
    x_tr, x_te = x_tr.astype(np.float64), x_te.astype(np.float64)
    shifted = [x + 100.0 for x in (x_tr, x_te)]
    centered = [knn_classify(a, y_tr, b, y_te)["top1"] for a, b in ((x_tr, x_te), shifted)]
    plain = [knn_classify(a, y_tr, b, y_te, KNNOptions(center=False))["top1"] for a, b in ((x_tr, x_te), shifted)]
    assert centered[0] == pytest.approx(centered[1], abs=1e-6)
    assert plain[1] < plain[0] - 0.03  # an offset crowds every neighbourhood under plain cosine
    assert knn_classify(x_tr[:5], y_tr[:5], x_te, y_te, KNNOptions(k=200))["k"] == 5  # k capped at the bank size


def test_pca_matches_sklearn_subspace(digits_split):
    x_tr, x_te, _, _ = digits_split
    ours_tr, ours_te = pca_features(x_tr, x_te, dim=20)
    ref = PCA(n_components=20).fit(x_tr)
    ref_te = ref.transform(x_te)
    assert ours_te.shape == (len(x_te), 20)
    np.testing.assert_allclose(np.abs(ours_te.numpy()), np.abs(ref_te), atol=2e-2, rtol=1e-3)


def test_pca_probe_fits_the_components_as_they_come_as_sklearn_does(digits_split):
    """The PCA baseline's probe (the seed's logistic regression on unscaled principal components) equals
    scikit-learn's at the same L2 strength, and low-variance components (here 150 of pure noise, 1e-3 the scale,
    as the rounding noise of upsampled uint8 digits) leave it unchanged, where standardizing would whiten them to
    the weight of the leading components and cost accuracy."""
    x_tr, x_te, y_tr, y_te = digits_split
    pca_tr, pca_te = pca_features(x_tr, x_te, dim=64)
    wd = 1e-3
    one_wd = ProbeOptions(weight_decays=(wd,), standardize=False)
    ours = linear_probe(pca_tr, y_tr, pca_te, y_te, one_wd)["top1"]
    reference = LogisticRegression(C=1.0 / (wd * len(y_tr)), max_iter=5000).fit(pca_tr.numpy(), y_tr)
    assert ours == pytest.approx(reference.score(pca_te.numpy(), y_te), abs=3 / len(y_te))

    g = torch.Generator().manual_seed(0)
    noisy = [torch.cat([x, 1e-3 * torch.randn(len(x), 150, generator=g)], dim=1) for x in (pca_tr, pca_te)]
    clean = linear_probe(pca_tr, y_tr, pca_te, y_te, PCA_PROBE)["top1"]
    as_they_come = linear_probe(noisy[0], y_tr, noisy[1], y_te, PCA_PROBE)["top1"]
    whitened = linear_probe(noisy[0], y_tr, noisy[1], y_te)["top1"]
    assert as_they_come == pytest.approx(clean, abs=2 / len(y_te)) and clean > 0.95
    assert whitened < clean - 0.02


def test_markdown_table_in_the_seeds_format():
    rows = [result_row("Logistic Regression", "SimCLR", "ResNet-18", 512, 256, 40, 0.703),
            result_row("KNN", "PCA Features", "-", 256, "-", "", 0.318)]
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| Linear Classifier | Feature Extractor | Architecture |")
    assert "70.3%" in table and "31.8%" in table


def test_knn_leaves_the_callers_features_unchanged(digits_split):
    x_tr, x_te, y_tr, y_te = digits_split
    bank, queries = torch.from_numpy(x_tr).clone(), torch.from_numpy(x_te).clone()
    before = bank.clone(), queries.clone()
    knn_classify(bank, y_tr, queries, y_te)
    assert torch.equal(bank, before[0]) and torch.equal(queries, before[1])
