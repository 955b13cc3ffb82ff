"""NT-Xent: against a direct full-matrix computation, and 2 gloo ranks against one process on the whole batch."""
import pytest
import torch

from trainer.loss import NTXentLoss


def reference_nt_xent(z1, z2, temperature, cosine):
    """The textbook loss, written independently: the full 2N x 2N similarity matrix, explicit loops."""
    z = torch.cat([z1, z2]).double()
    if cosine:
        z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    sim = z @ z.T / temperature
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        denom = sum(torch.exp(sim[i, k]) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(sim[i, pos]) / denom)
    return total / n2


@pytest.mark.parametrize("cosine", [True, False])
def test_single_process_matches_reference(cosine):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    scale = 1.0 if cosine else 0.3
    loss = NTXentLoss(temperature=0.5, use_cosine_similarity=cosine)(z1 * scale, z2 * scale)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(reference_nt_xent(z1 * scale, z2 * scale, 0.5, cosine).item(), rel=1e-5)


def test_accuracy_counts_rows_whose_positive_is_nearest():
    z1 = torch.eye(4)
    z2 = torch.eye(4) + 0.01  # each view's nearest other column is its pair
    z2[3] = -torch.eye(4)[3]  # except sample 3, whose views point apart: its 2 rows miss
    loss, top1 = NTXentLoss(0.1)(z1, z2, return_accuracy=True)
    assert top1.item() == pytest.approx(6 / 8)
    assert loss.item() == pytest.approx(reference_nt_xent(z1, z2, 0.1, True).item(), rel=1e-5)


def test_logits_are_fp32_for_half_inputs():
    """bf16 embeddings (autocast's output) give the fp32 loss of those same values: the logits are computed in
    fp32. Logits in bf16 (8 bits of mantissa) would be off by about 1e-2 here."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(32, 128, generator=g).bfloat16(), torch.randn(32, 128, generator=g).bfloat16()
    half = NTXentLoss(0.1)(z1, z2)
    assert half.dtype == torch.float32
    want = reference_nt_xent(z1.float(), z2.float(), 0.1, True).item()
    assert half.item() == pytest.approx(want, abs=1e-5)


def _rank_loss_and_grads(rank, world_size, z1_all, z2_all, cosine):
    n = z1_all.shape[0] // world_size
    z1 = z1_all[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    z2 = z2_all[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = NTXentLoss(temperature=0.3, use_cosine_similarity=cosine)(z1, z2)
    loss.backward()
    # DDP averages gradients over ranks: what the parameters see is grad / world_size
    return loss.detach(), z1.grad / world_size, z2.grad / world_size


@pytest.mark.parametrize("cosine", [True, False])
def test_two_ranks_equal_one_process_on_concatenated_batch(distributed_run, cosine):
    g = torch.Generator().manual_seed(2)
    z1_all, z2_all = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    results = distributed_run(_rank_loss_and_grads, 2, z1_all, z2_all, cosine)

    z1 = z1_all.clone().requires_grad_(True)
    z2 = z2_all.clone().requires_grad_(True)
    full = NTXentLoss(temperature=0.3, use_cosine_similarity=cosine)(z1, z2)
    full.backward()
    mean_loss = sum(r[0] for r in results) / 2
    assert mean_loss.item() == pytest.approx(full.item(), abs=1e-5)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), z1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r[2] for r in results]), z2.grad, atol=1e-5, rtol=1e-5)
    assert full.item() == pytest.approx(reference_nt_xent(z1_all, z2_all, 0.3, cosine).item(), rel=1e-5)


def test_rejects_mismatched_views_and_a_temperature_that_is_not_positive():
    with pytest.raises(ValueError, match=r"got \(4, 3\) and \(5, 3\)"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="temperature=0"):
        NTXentLoss(temperature=0)
