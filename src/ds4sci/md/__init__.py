"""Molecular dynamics with machine-learned force fields (ViSNet), AI2BMD-style.

    neighbors    Verlet list (cell list + skin), padded static-shape table
    potential    Potential (model + neighbour list + checks), save_model / load_model
    integrators  VelocityVerlet (NVE), LangevinBAOAB (NVT), maxwell_boltzmann
    calculator   DS4SciCalculator (ASE)
    run          run_md (structure file -> trajectory, thermo log, plot)
    cli          main(argv) for ``ds4sci md run``
"""
