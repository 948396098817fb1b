"""Bundled synthetic sample data, installed with lckd_kit as the package ``lckd_kit.data_samples``.

Find it with :func:`lckd_kit.paths.data_samples_dir`; see README.md in this folder.
"""
