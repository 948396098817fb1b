"""The trained model shipped with lckd_kit, installed as the package ``lckd_kit.checkpoints``.

Find it with :func:`lckd_kit.paths.shipped_checkpoint`; see README.md in this folder.
"""
