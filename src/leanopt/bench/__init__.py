"""The benchmark: small GPTs trained on real text, testing each paper's claims.

``leanopt prepare`` builds the data (:mod:`.data`), ``leanopt bench PRESET`` trains
(:mod:`.train`, presets in :mod:`.tasks`) and ``leanopt report RUN_DIR`` writes the
report (:mod:`.report`). Needs the ``bench`` extras (tokenizers, matplotlib, tqdm).
"""
