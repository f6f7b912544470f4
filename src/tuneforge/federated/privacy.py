"""The privacy record of a federated run: what Flower's DP wrapper did, with its parameters, and -- when opacus is
installed -- the client-level (epsilon, delta) its RDP accountant gives for that many rounds of the Gaussian
mechanism at that sampling rate. Without opacus, epsilon is recorded as not computed (never guessed)."""

from __future__ import annotations


def privacy_record(fed, sampled: int) -> dict | None:
    privacy = fed.privacy
    if privacy is None:
        return None
    clients = fed.clients or sampled
    stdev = privacy.noise_multiplier * privacy.clipping_norm / sampled
    record = {
        "mechanism": "central differential privacy, fixed clipping (Flower "
                     + ("DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod" if privacy.clipping == "client"
                        else "DifferentialPrivacyServerSideFixedClipping") + ")",
        "clipping": privacy.clipping, "clipping_norm": privacy.clipping_norm,
        "noise_multiplier": privacy.noise_multiplier, "noise_stdev": stdev, "sampled_clients": sampled,
        "clients": clients, "sample_rate": sampled / clients, "rounds": fed.rounds, "delta": privacy.delta,
        "unit": "client (one client's whole update per round)", "secure_aggregation": False,
    }
    record.update(epsilon(privacy.noise_multiplier, sampled / clients, fed.rounds, privacy.delta))
    return record


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> dict:
    """{"epsilon": value or None, "accountant": how it was computed (or why not)}."""
    if noise_multiplier <= 0:
        return {"epsilon": None, "accountant": "none: noise_multiplier is 0, so there is no privacy guarantee "
                                               "(clipping only)"}
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        return {"epsilon": None, "accountant": "not computed: pip install opacus to have its RDP accountant compute "
                                               "epsilon from these parameters"}
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return {"epsilon": float(accountant.get_epsilon(delta=delta)),
            "accountant": "opacus RDPAccountant (sampled Gaussian mechanism, one step per round)"}
