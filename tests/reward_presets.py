"""The CE-PO authors' reward settings (docs/design.md#combiner): the table the shipped overlays in
``configs/rewards/`` are checked against. Test data, not used by the package."""

# Preset name -> (p, weights in the order accuracy, S_ZX, S_XY, S_ZY).
PRESETS: dict[str, tuple[float, tuple[float, float, float, float]]] = {
    "cepo": (0.2, (0.7, 0.1, 0.1, 0.1)),  # CE-PO default (inferred); also the p = 0.2 point of the p ablation
    "cepo_geometric": (0.0, (0.7, 0.1, 0.1, 0.1)),
    "accuracy_only": (1.0, (1.0, 0.0, 0.0, 0.0)),  # the outcome-only baseline
    "jacobian_only": (0.2, (0.0, 1 / 3, 1 / 3, 1 / 3)),  # ablation; the authors also ran it at p = 1
    "jacobian_only_linear": (1.0, (0.0, 1 / 3, 1 / 3, 1 / 3)),
    # Reward-hacking study with unhardened scores; the table's 0.133 is 0.4 / 3 rounded.
    "naive_jacobian": (1.0, (0.6, 0.4 / 3, 0.4 / 3, 0.4 / 3)),
    "weights_0.5": (0.2, (0.5, 1 / 6, 1 / 6, 1 / 6)),  # weight ablation
}

# The exponents of the p ablation, all with the "cepo" weights (p = 0.2 is the "cepo" preset itself).
P_ABLATION: tuple[float, ...] = (-2.0, 0.0, 0.2, 0.7, 1.0, 10.0)
