"""Training sets from the composition alone (seed 000 section II.A; seed 003 section 3.3).

* :mod:`~xtalforge.datasets.meltquench` — melt–quench–anneal MD with the oracle
  (``run_meltquench``), checkpointed and resumable;
* :mod:`~xtalforge.datasets.onthefly` — the same protocol driven by an NNP ensemble, the
  oracle called only for uncertain frames (``OnTheFlyLabeller``);
* :mod:`~xtalforge.datasets.deform` — elastic-deformation augmentation (``label_deformations``);
* :mod:`~xtalforge.datasets.coverage` — descriptor PCA coverage, NNP-vs-oracle energy
  correlation and the scale-up check (``scale_up_report``);
* :mod:`~xtalforge.datasets.commands` — the ``xtalforge dataset`` command.

Submodules are imported on use: the CLI imports this package to register its command.
"""
