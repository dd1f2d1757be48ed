"""Closed-form bounds and deterministic certificates, derived in the setting of Qian & Klabjan
(2021) (docs/theory.md). No file I/O, no printing; it imports only the prunebound core.

One planner per guarantee, each with its own home::

    plan, bound, BoundResult          # prior-law or trained Lemma A plans, and their inverse
    data_plan, search_data_plan       # plans certified on held-out data (heldout_plan)
    certify, Certificate              # deterministic certificate of a pruned model (certificate)
    data_certificate, DataCertificate # held-out-data certificate of a pruned model (datacert)
    check_law, check_model            # KS tests of the weight-law assumption (assumptions)
    extract, from_widths, conv_specs  # model / widths -> layer specs (network, resolve)
    Plan, LayerPlan, LayerSpec, Law   # shared value types (values)
    propagate, Propagation            # Lemma A (lemma_a)
    randmat                           # random-matrix norm bounds (module)

Plans from sampled networks are statistical, so they live with the Monte Carlo engine:
`prunebound.check.sampled_plan(plan(...))`. Words: `delta` is a probability over random
weights or masks, `confidence` the level of a statistical limit, `alpha` a test's level
(`theory.values`).

Module map: planner (plan, bound) -> oracles (per-layer norm bounds: prior_bounds, randmat,
norms) -> budget (eps shared across layers) -> lemma_a; tighten (trained plans grown by
certificates); certificate -> network (the modelled chain), slopes, layer_norms; resolve
(a planning target into layer specs).
"""

from prunebound.theory import randmat
from prunebound.theory.assumptions import check_law, check_model
from prunebound.theory.certificate import Certificate, certify
from prunebound.theory.datacert import DataCertificate, data_certificate
from prunebound.theory.heldout_plan import data_plan, search_data_plan
from prunebound.theory.lemma_a import Propagation, propagate
from prunebound.theory.network import extract
from prunebound.theory.planner import BoundResult, bound, plan
from prunebound.theory.resolve import conv_specs, from_widths
from prunebound.theory.values import Law, LayerPlan, LayerSpec, Plan

__all__ = [
    "BoundResult",
    "Certificate",
    "DataCertificate",
    "Law",
    "LayerPlan",
    "LayerSpec",
    "Plan",
    "Propagation",
    "bound",
    "certify",
    "check_law",
    "check_model",
    "conv_specs",
    "data_certificate",
    "data_plan",
    "extract",
    "from_widths",
    "plan",
    "propagate",
    "randmat",
    "search_data_plan",
]
