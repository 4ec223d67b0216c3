"""DiG network: pair-biased attention vs naive, symmetries, init, bad inputs."""

import pytest
import torch

from ds4sci.data.conformations import shortest_paths
from ds4sci.models.dig import DiGConfig, build_model, get_config, initial_value

CFG = get_config("dig-tiny", d_model=32, d_pair=16, num_layers=2, num_heads=4, d_ffn=32,
                 num_rbf=8, num_chiral=3)


def molecule(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    bonds = torch.zeros(n, n, dtype=torch.long)
    for i in range(1, n):  # a random tree
        j = int(torch.randint(0, i, (1,), generator=g))
        bonds[i, j] = bonds[j, i] = int(torch.randint(1, 3, (1,), generator=g))
    return {"atom_types": torch.randint(1, 5, (1, n), generator=g), "bonds": bonds[None],
            "path": shortest_paths(bonds)[None], "mask": torch.ones(1, n, dtype=torch.bool)}


def random_rotation(seed, dtype=torch.float32):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return (q * torch.linalg.det(q)).to(dtype)  # det +1



def assert_same_gradients(model, out, ref_model, ref_out, *, rtol, atol):
    """Backward of ``sum(out^2)`` through both models; every parameter's gradient equal."""
    ref_out.square().sum().backward()
    out.square().sum().backward()
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")

def test_pair_biased_attention_matches_naive_values_and_gradients():
    mol = molecule(9)
    ours = build_model(CFG, seed=1)
    naive = build_model(CFG.replace(naive_attention=True), seed=1)
    x = torch.randn(3, 9, 3)
    sigma = torch.tensor([0.1, 1.0, 5.0])
    out_a, out_b = ours(x, sigma, mol), naive(x, sigma, mol)
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    assert_same_gradients(ours, out_a, naive, out_b, rtol=1e-3, atol=1e-5)


def test_padding_does_not_change_real_nodes():
    mol = molecule(6)
    model = build_model(CFG, seed=2)
    x = torch.randn(2, 6, 3)
    sigma = torch.tensor([0.5, 2.0])
    ref = model(x, sigma, mol)
    pad = {"atom_types": torch.cat([mol["atom_types"], torch.zeros(1, 3, dtype=torch.long)], 1),
           "bonds": torch.nn.functional.pad(mol["bonds"], (0, 3, 0, 3)),
           "path": torch.nn.functional.pad(mol["path"], (0, 3, 0, 3), value=9),
           "mask": torch.cat([mol["mask"], torch.zeros(1, 3, dtype=torch.bool)], 1)}
    xp = torch.cat([x, 7 * torch.randn(2, 3, 3)], 1)
    out = model(xp, sigma, pad)
    torch.testing.assert_close(out[:, :6], ref, rtol=1e-4, atol=1e-5)
    assert out[:, 6:].abs().max() == 0


def test_rotation_translation_permutation_equivariance_and_chirality():
    mol = molecule(8)
    model = build_model(CFG, seed=3)
    x = torch.randn(4, 8, 3) * 1.5
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0])
    eps = model(x, sigma, mol)
    assert eps.sum(1).abs().max() < 1e-4  # zero centre of mass
    R = random_rotation(0)
    torch.testing.assert_close(model(x @ R.T + torch.tensor([3.0, -2.0, 5.0]), sigma, mol),
                               eps @ R.T, rtol=1e-3, atol=2e-4)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    pmol = {"atom_types": mol["atom_types"][:, perm], "mask": mol["mask"][:, perm],
            "bonds": mol["bonds"][:, perm][:, :, perm], "path": mol["path"][:, perm][:, :, perm]}
    torch.testing.assert_close(model(x[:, perm], sigma, pmol), eps[:, perm], rtol=1e-3,
                               atol=2e-4)
    # A mirror image is a different molecule for a chiral model: not reflection-equivariant...
    mirrored = model(-x, sigma, mol)
    assert (mirrored - (-eps)).abs().max() > 1e-3
    # ...and without the pseudoscalar features (global and local) it is E(3)-equivariant
    # (the racemic model).
    assert CFG.num_chiral and CFG.num_local_chiral  # both on above
    achiral = build_model(CFG.replace(num_chiral=0, num_local_chiral=0), seed=3)
    torch.testing.assert_close(achiral(-x, sigma, mol), -achiral(x, sigma, mol), rtol=1e-3,
                               atol=2e-4)


def test_initial_value_is_deterministic_and_covers_every_parameter():
    model = build_model(CFG, seed=0)
    again = build_model(CFG, seed=0)
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), name
        v = initial_value(name, p.shape, torch.Generator().manual_seed(0))
        assert v.shape == p.shape
    with pytest.raises(ValueError, match="no rule for parameter 'foo.weird'"):
        initial_value("foo.weird", (3,), torch.Generator())


def test_bad_inputs_raise_clear_errors():
    model = build_model(CFG.replace(max_atoms=8), seed=0)
    x = torch.randn(1, 9, 3)
    with pytest.raises(ValueError, match="9 nodes; this model's max_atoms is 8"):
        model(x, torch.ones(1), molecule(9))
    mol = molecule(5)
    mol["atom_types"] = mol["atom_types"].clone()
    mol["atom_types"][0, 0] = 99
    with pytest.raises(ValueError, match=r"atom_types in \[.*99\]; expected \[0, 16\)"):
        model(torch.randn(1, 5, 3), torch.ones(1), mol)
    with pytest.raises(ValueError, match="d_model = 30 is not divisible by num_heads = 4"):
        DiGConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="preset 'dig-huge' is unknown"):
        get_config("dig-huge")


def test_protein_preset_shapes():
    cfg = get_config("dig-protein")
    assert (cfg.d_model, cfg.d_pair, cfg.num_layers, cfg.num_heads) == (768, 256, 12, 32)
    small = cfg.replace(d_model=32, d_pair=8, num_layers=1, num_heads=4, d_ffn=16,
                        d_single_in=6, d_pair_in=4, relpos_bins=4)
    model = build_model(small)
    L = 5
    mol = {"atom_types": torch.randint(1, 21, (1, L)), "bonds": torch.zeros(1, L, L).long(),
           "path": torch.full((1, L, L), 2), "mask": torch.ones(1, L, dtype=torch.bool),
           "single_repr": torch.randn(1, L, 6), "pair_repr": torch.randn(1, L, L, 4)}
    assert model(torch.randn(2, L, 3), torch.ones(2), mol).shape == (2, L, 3)


@pytest.mark.parametrize("pair_chunk,checkpoint_layers", [(3, 2), (0, 1)])
def test_pair_chunking_and_checkpointing_are_exact(pair_chunk, checkpoint_layers):
    # Protein-style conditioning too (external single/pair representations, relative
    # positions), N = 11 not a multiple of the tile: every op on z runs tile by tile.
    cfg = CFG.replace(num_layers=3, d_single_in=5, d_pair_in=6, relpos_bins=4,
                      local_chiral_head=True, num_torsion=2)
    n = 11
    mol = molecule(n)
    g = torch.Generator().manual_seed(0)
    mol["single_repr"] = torch.randn(1, n, 5, generator=g, dtype=torch.float64)
    mol["pair_repr"] = torch.randn(1, n, n, 6, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64)
    ref = build_model(cfg, seed=1).double()
    tiled = build_model(cfg.replace(pair_chunk=pair_chunk, checkpoint_layers=checkpoint_layers),
                        seed=1).double()
    assert len(tiled.row_tiles(n)) == (-(-n // pair_chunk) if pair_chunk else 1)
    out_ref, out = ref(x, sigma, mol), tiled(x, sigma, mol)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    assert_same_gradients(tiled, out, ref, out_ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the sampler's path: z0 filled tile by tile, no recomputation
        cond = tiled.condition(mol)
        torch.testing.assert_close(cond[1], ref.condition(mol)[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tiled(x, sigma, mol, cond), out_ref, rtol=1e-12, atol=1e-12)


def test_pair_chunk_rejects_negative():
    with pytest.raises(ValueError, match=r"pair_chunk = -1; expected an integer >= 0"):
        DiGConfig(pair_chunk=-1)


def local_chirality_reference(model, x_N3, mol):
    """The local pseudoscalar written atom by atom, loops over neighbours (fp64)."""
    bonds, types = mol["bonds"][0], mol["atom_types"][0]
    emb = model.local_chiral_atom_embed.weight.double()
    deg = (bonds > 0).sum(-1)
    K = model.config.num_local_chiral
    chi = torch.zeros(len(types), K, dtype=torch.float64)
    for i in range(len(types)):
        v = torch.zeros(3, K, 3, dtype=torch.float64)
        for a in torch.nonzero(bonds[i] > 0).flatten().tolist():
            h = (emb[types[a]] + model.local_chiral_degree_embed.weight.double()[min(deg[a], 6)]
                 + sum(emb[types[b]] for b in torch.nonzero(bonds[a] > 0).flatten().tolist()))
            w = model.local_chiral_weight(h).view(3, K)
            v += w[:, :, None] * (x_N3[a] - x_N3[i])
        for k in range(K):
            det = torch.linalg.det(v[:, k])  # rows v_k1, v_k2, v_k3
            chi[i, k] = det / (v[:, k].norm(dim=-1).prod() + 1e-6)
    return chi


def stereocentre_molecule():
    n = 8
    bonds = torch.zeros(n, n, dtype=torch.long)
    for i, j in [(0, 1), (0, 2), (0, 3), (0, 4), (1, 5), (1, 6), (2, 7)]:
        bonds[i, j] = bonds[j, i] = 1
    return {"atom_types": torch.tensor([[1, 1, 3, 2, 4, 4, 4, 4]]), "bonds": bonds[None],
            "path": shortest_paths(bonds)[None], "mask": torch.ones(1, n, dtype=torch.bool)}


def test_local_chirality_feature_reference_invariance_and_mirror():
    # Atom 0 is a stereocentre (4 different neighbours); atom 1 has 3 neighbours, two of them
    # alike (5 and 6: same element, degree and neighbours), so it is not one; the rest have
    # fewer than 3 bonds.
    n = 8
    mol = stereocentre_molecule()
    model = build_model(CFG.replace(num_local_chiral=5), seed=4).double()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["local_chiral_atom_embed.weight", "local_chiral_degree_embed.weight",
                      "local_chiral_weight.weight", "local_chiral_weight.bias"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, n, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        chi = model.local_chirality(x, mol)
        assert chi.shape == (3, n, 5)
        for b in range(3):
            torch.testing.assert_close(chi[b], local_chirality_reference(model, x[b], mol),
                                       rtol=1e-10, atol=1e-12)
        assert chi[:, 0].abs().min() > 1e-5 and chi.abs().max() <= 1
        assert chi[:, 1:].abs().max() < 1e-12  # alike substituents or coplanar v's: 0
        R = random_rotation(1, torch.float64)
        torch.testing.assert_close(model.local_chirality(x @ R.T + 2.5, mol), chi,
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.local_chirality(-x, mol), -chi, rtol=1e-10, atol=1e-12)
        # The normals of local_chiral_head: v_k2 x v_k3 / (|v_k2||v_k3| + eps), a pseudovector
        _, nrm = model.local_chirality(x, mol, normals=True)
        assert nrm.shape == (3, n, 5, 3) and nrm.norm(dim=-1).max() <= 1
        _, nrm_rot = model.local_chirality(x @ R.T + 2.5, mol, normals=True)
        torch.testing.assert_close(nrm_rot, nrm @ R.T, rtol=1e-10, atol=1e-12)
        _, nrm_mirror = model.local_chirality(-x, mol, normals=True)
        torch.testing.assert_close(nrm_mirror, nrm, rtol=1e-10, atol=1e-12)  # no flip
        perm = torch.randperm(n, generator=g)
        pmol = {"atom_types": mol["atom_types"][:, perm], "mask": mol["mask"][:, perm],
                "bonds": mol["bonds"][:, perm][:, :, perm],
                "path": mol["path"][:, perm][:, :, perm]}
        torch.testing.assert_close(model.local_chirality(x[:, perm], pmol), chi[:, perm],
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head", [False, True])
def test_model_with_only_local_chirality_is_se3_not_e3_equivariant(head):
    mol = stereocentre_molecule()
    model = build_model(CFG.replace(num_chiral=0, num_local_chiral=4, local_chiral_head=head),
                        seed=6).double()
    x = torch.randn(3, 8, 3, dtype=torch.float64) * 1.5
    sigma = torch.tensor([0.05, 0.5, 3.0], dtype=torch.float64)
    eps = model(x, sigma, mol)
    R = random_rotation(2, torch.float64)
    torch.testing.assert_close(model(x @ R.T - 1.0, sigma, mol), eps @ R.T, rtol=1e-9,
                               atol=1e-11)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    pmol = {"atom_types": mol["atom_types"][:, perm], "mask": mol["mask"][:, perm],
            "bonds": mol["bonds"][:, perm][:, :, perm], "path": mol["path"][:, perm][:, :, perm]}
    torch.testing.assert_close(model(x[:, perm], sigma, pmol), eps[:, perm], rtol=1e-9,
                               atol=1e-11)
    assert (model(-x, sigma, mol) + eps).abs().max() > 1e-3  # the mirror image differs
    achiral = build_model(CFG.replace(num_chiral=0, num_local_chiral=0), seed=6).double()
    torch.testing.assert_close(achiral(-x, sigma, mol), -achiral(x, sigma, mol), rtol=1e-9,
                               atol=1e-11)


def test_checkpoint_without_local_chirality_field_loads_as_off(tmp_path):
    from pathlib import Path

    from ds4sci.models.dig.sample import load_checkpoint

    committed = Path(__file__).parents[1] / "benchmarks/results/dig_ala2_cpu/dig_ala2.pt"
    state = torch.load(committed, weights_only=True)
    assert "num_local_chiral" not in state["config"]  # saved before the field existed
    model = load_checkpoint(committed)
    assert model.config.num_local_chiral == 0 and model.local_chiral_proj is None
    assert get_config("dig-tiny").num_local_chiral > 0


def test_edm_preconditioning_formula_and_loss_weight():
    from ds4sci.models.dig import denoising_loss_sum
    from ds4sci.models.dig.diffusion import centred_noise, training_sigmas
    from ds4sci.models.dig.model import centre

    mol = stereocentre_molecule()
    plain = build_model(CFG, seed=7).double()
    edm = build_model(CFG.replace(precondition="edm"), seed=7).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 3, generator=g, dtype=torch.float64) * 2
    sigma = torch.tensor([0.02, 0.7, 9.0], dtype=torch.float64)
    sd = CFG.sigma_data
    c_in = (sigma ** 2 + sd ** 2).rsqrt()[:, None, None]
    # D = c_skip x + c_out F with F the plain model's head output; eps = (x - D) / sigma
    xc = centre(x, mol["mask"].expand(3, 8))
    c_skip, c_out = sd ** 2 * c_in ** 2, sigma[:, None, None] * sd * c_in
    D = c_skip * xc + c_out * plain(x, sigma, mol)
    expected = (xc - D) / sigma[:, None, None]
    torch.testing.assert_close(edm(x, sigma, mol), expected, rtol=1e-10, atol=1e-12)
    R = random_rotation(3, torch.float64)
    torch.testing.assert_close(edm(x @ R.T, sigma, mol), edm(x, sigma, mol) @ R.T, rtol=1e-9,
                               atol=1e-11)
    # The loss weights each sample's eps error by (sigma^2 + sd^2)/sd^2: redo its draws.
    batch = {"x": xc, **mol}
    loss, count = denoising_loss_sum(edm, batch, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    s_B = training_sigmas(edm.config, 3, g).double()
    eps = centred_noise(xc.shape, mol["mask"], g, torch.float64)
    err_B = (edm(xc + s_B[:, None, None] * eps, s_B, mol) - eps).pow(2).sum((1, 2))
    torch.testing.assert_close(loss.double(), (err_B * (s_B ** 2 + sd ** 2) / sd ** 2).sum(),
                               rtol=1e-5, atol=0)
    assert count == 3 * 8 * 3
    with pytest.raises(ValueError, match="precondition = 'karras'; expected 'none' or 'edm'"):
        CFG.replace(precondition="karras")
    with pytest.raises(ValueError, match="local_chiral_head = True needs num_local_chiral > 0"):
        CFG.replace(num_local_chiral=0, local_chiral_head=True)


def test_torsion_quadruples_of_a_chain_a_branch_and_a_ring():
    from ds4sci.data.conformations import torsion_quadruples

    def bonds_of(n, edges):
        b = torch.zeros(1, n, n, dtype=torch.long)
        for i, j in edges:
            b[0, i, j] = b[0, j, i] = 1
        return b

    chain = torsion_quadruples(bonds_of(5, [(0, 1), (1, 2), (2, 3), (3, 4)]))
    assert sorted(map(tuple, chain[:, 1:].tolist())) == [
        (0, 1, 2, 3), (1, 2, 3, 4), (3, 2, 1, 0), (4, 3, 2, 1)]
    assert (chain[:, 0] == 0).all()
    # A three-membered ring closes on itself (i == l), a four-membered one does not.
    assert len(torsion_quadruples(bonds_of(3, [(0, 1), (1, 2), (2, 0)]))) == 0
    ring4 = torsion_quadruples(bonds_of(4, [(0, 1), (1, 2), (2, 3), (3, 0)]))
    assert len(ring4) == 8 and (ring4[:, 1] != ring4[:, 4]).all()
    assert torsion_quadruples(bonds_of(2, [(0, 1)])).shape == (0, 5)


def test_torsion_features_are_mdtraj_dihedrals_and_se3_not_e3_invariant():
    import mdtraj

    from ds4sci.data.conformations import alanine_dipeptide_dataset, load_alanine_dipeptide

    ds = alanine_dipeptide_dataset()
    mol = ds.molecule
    model = build_model(CFG.replace(num_torsion=2), seed=1).double()
    x = torch.stack([ds[i] for i in range(0, 400, 50)]).double()
    T = model.torsion_features(x, mol)
    assert T.shape == (8, 22, 22, 4)
    _, top, _ = load_alanine_dipeptide()
    quads = mol["torsions"][:, 1:].numpy()
    traj = mdtraj.Trajectory(x.numpy().astype("float32") / 10, top)
    theta = torch.from_numpy(mdtraj.compute_dihedrals(traj, quads)).double()  # [8, Q]
    i, l = mol["torsions"][:, 1], mol["torsions"][:, 4]
    torch.testing.assert_close(T[:, i, l, 0], theta.cos(), rtol=0, atol=2e-5)  # m = 1
    torch.testing.assert_close(T[:, i, l, 2], theta.sin(), rtol=0, atol=2e-5)
    torch.testing.assert_close(T[:, i, l, 1], (2 * theta).cos(), rtol=0, atol=4e-5)  # m = 2
    torch.testing.assert_close(T[:, i, l, 3], (2 * theta).sin(), rtol=0, atol=4e-5)
    one_four = torch.zeros(22, 22, dtype=torch.bool)
    one_four[i, l] = True
    assert (mol["path"][0][one_four] == 3).all()  # no rings: every chain is a 3-bond path
    assert T[:, ~one_four].abs().max() == 0  # zero off the 1-4 pairs, symmetric in i, l
    torch.testing.assert_close(T, T.transpose(1, 2), rtol=0, atol=1e-12)
    R = random_rotation(5, torch.float64)
    torch.testing.assert_close(model.torsion_features(x @ R.T + 3.0, mol), T, rtol=0,
                               atol=1e-12)
    mirrored = model.torsion_features(-x, mol)  # cosines stay, sines flip
    torch.testing.assert_close(mirrored, torch.cat([T[..., :2], -T[..., 2:]], -1), rtol=0,
                               atol=1e-12)
    perm = torch.randperm(22, generator=torch.Generator().manual_seed(0))
    pmol = {"atom_types": mol["atom_types"][:, perm], "mask": mol["mask"][:, perm],
            "bonds": mol["bonds"][:, perm][:, :, perm], "path": mol["path"][:, perm][:, :, perm]}
    torch.testing.assert_close(model.torsion_features(x[:, perm], pmol),  # chains derived
                               T[:, perm][:, :, perm], rtol=0, atol=1e-12)
    # the network with torsions as its only pseudoscalar: SE(3)- but not E(3)-equivariant
    net = build_model(CFG.replace(num_chiral=0, num_local_chiral=0, num_torsion=2),
                      seed=2).double()
    sigma = torch.full((8,), 0.5, dtype=torch.float64)
    eps = net(x, sigma, mol)
    torch.testing.assert_close(net(x @ R.T + 3.0, sigma, mol), eps @ R.T, rtol=1e-9,
                               atol=1e-11)
    torch.testing.assert_close(net(x[:, perm], sigma, pmol), eps[:, perm], rtol=1e-9,
                               atol=1e-11)
    assert (net(-x, sigma, mol) + eps).abs().max() > 1e-3


def test_dig_ala2_preset_is_the_committed_v3_model():
    from pathlib import Path

    from ds4sci.models.dig.sample import load_checkpoint

    committed = Path(__file__).parents[1] / "benchmarks/results/dig_ala2_cpu_v3/dig_ala2.pt"
    assert load_checkpoint(committed).config == get_config("dig-ala2")
