"""Small trained sample models and data shipped with qatconv (digits MLP, tabular ResNet).

These files are examples and test fixtures, not part of the installed ``qatconv`` package.
Regenerate everything with ``python -m sample_models.make_samples`` from the repository root.
"""
