"""Research code kept out of the production package: sampler experiments and baselines.

The ablations of ``release/validate.py`` and the option search of
``release/select_options.py`` import from here (``release/`` is on ``sys.path`` when
they run). Nothing in ``idgbr_geo`` imports it: no shipped card uses these options.

* :mod:`research.sampling`: the DDIM sampler with its experiment knobs (``start="coarse"``
  with ``t_start``, classifier-free ``guidance_scale``, ``x0="hard"``, trajectory
  ``average``) and the ``band`` limit, wrapped as a refiner (:class:`ResearchRefiner`).
* :mod:`research.crf`: the dense CRF baseline (needs ``pip install pydensecrf2``).
"""
