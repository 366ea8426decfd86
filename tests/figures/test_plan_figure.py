"""The plan's heatmap is a pure function of its table: cells, values, labels and hover text."""
import math

import numpy as np
import pandas as pd

from workbench.figures import plan_figure

KINDS = ["q", "k", "v", "o", "gate", "up", "down"]


def plan_table(blocks=2, skip=()):
    rows = []
    for b in range(blocks):
        for i, k in enumerate(KINDS):
            if (b, k) in skip:
                continue
            bits = (2, 3, 4, 8)[(b + i) % 4]
            rows.append({"name": f"model.layers.{b}.{k}", "block": b, "kind": k, "bits": bits,
                         "cost": 10.0 ** -bits, "pinned": (b, k) == (1, "down"),
                         "cost_2": 1e-2, "cost_3": 1e-3, "cost_4": 1e-4, "cost_8": math.nan})
    return pd.DataFrame(rows)


def test_one_cell_per_layer_colored_by_its_width():
    table = plan_table()
    fig = plan_figure(table, KINDS)
    [heat] = fig.data
    z = np.asarray(heat.z)
    assert heat.type == "heatmap" and z.shape == (2, 7)                     # blocks down, kinds across
    assert list(heat.x) == KINDS and list(heat.y) == [0, 1] and fig.layout.yaxis.autorange == "reversed"
    assert z[1, 2] == table.query("block == 1 and kind == 'v'")["bits"].item()
    assert (heat.zmin, heat.zmax) == (2, 8)                                 # one scale for every plan
    assert list(heat.colorbar.tickvals) == list(range(2, 9))
    assert heat.text[0][0] == "2" and heat.text[1][6] == "8*"             # the pinned cell is marked
    assert heat.customdata[0][1] == "model.layers.0.k"                     # clicks can name the layer


def test_hover_gives_the_width_and_the_predicted_costs():
    fig = plan_figure(plan_table(), KINDS, cost_label="fisher cost")
    hover = fig.data[0].hovertext
    assert hover[0][1].startswith("block 0 · k<br>model.layers.0.k<br><b>3 bits</b>")
    assert "predicted fisher cost 0.001" in hover[0][1]
    assert "at 2: 0.01, 3: 0.001, 4: 0.0001, 8: not measured" in hover[0][1]
    assert "(pinned)" in hover[1][6] and "(pinned)" not in hover[0][0]


def test_layers_left_out_are_blank_and_an_empty_plan_is_a_placeholder():
    fig = plan_figure(plan_table(skip={(0, "o")}), KINDS)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert math.isnan(z[0, 3]) and fig.data[0].hovertext[0][3] == "full precision"
    assert np.isfinite(z).sum() == 13
    # without the optional columns: widths only
    bare = plan_figure(pd.DataFrame({"block": [0, 0], "kind": ["q", "k"], "bits": [4, 8]}))
    assert list(bare.data[0].x) == ["q", "k"] and "predicted" not in bare.data[0].hovertext[0][0]
    empty = plan_figure(pd.DataFrame())
    assert len(empty.data) == 0 and empty.layout.annotations[0].text == "press Make plan"
