"""Bounds derived in the setting of Qian & Klabjan (2021): plans, certificates, checks.

Pure math (docs/theory.md): no file I/O, no printing. The API::

    plan, bound, BoundResult                 # a priori / trained plans and their inverse
    certify, Certificate                     # deterministic certificate of a pruned model
    data_certificate, search_data_plan       # held-out-data certificates
    check_law, check_model                   # KS tests of the weight-law assumption
    extract, from_widths                     # model -> layer specs
    Plan, LayerPlan, LayerSpec, Law          # shared value types
    propagate, Propagation                   # Lemma A
    randmat                                  # random-matrix norm bounds (module)
"""

from prunebound.theory import randmat
from prunebound.theory.assumptions import check_law, check_model
from prunebound.theory.certify import Certificate, certify
from prunebound.theory.datacert import DataCertificate, data_certificate, search_data_plan
from prunebound.theory.network import extract, from_widths
from prunebound.theory.plan import BoundResult, bound, plan
from prunebound.theory.propagate import Propagation, propagate
from prunebound.theory.types import Law, LayerPlan, LayerSpec, Plan

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
    "data_certificate",
    "extract",
    "from_widths",
    "plan",
    "propagate",
    "randmat",
    "search_data_plan",
]
