"""Comparisons shared by the checkpoint tests (collected by pytest as a module without tests)."""

import torch


def assert_equal_state(a: dict, b: dict) -> None:
    """Full (unsharded) model and optimizer states are equal bit for bit."""
    assert a["step"] == b["step"] and a["cursor"] == b["cursor"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model {k} differs"
    sa, sb = a["optim"]["state"], b["optim"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for fqn in sa:
        for name in sa[fqn]:
            x, y = sa[fqn][name], sb[fqn][name]
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), f"optim {fqn}.{name} differs"
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"]
