"""The usage chart (pure markup from points) and the usage history it is drawn from."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from appliance.auth.usage import appended_history, project_history
from appliance.auth.web.chart import usage_chart

GIB = 1024**3


def test_no_points_no_chart() -> None:
    assert usage_chart([], None, "x") == ""


def test_chart_is_valid_svg_with_a_step_line_and_the_quota() -> None:
    svg = usage_chart([(0.0, GIB), (86400.0, 2 * GIB)], 4 * GIB, 'use of <team/app> "x"')
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.get("role") == "img" and root.get("aria-label") == 'use of <team/app> "x"'
    path = root.find(f"{ns}path").get("d").split()
    assert len(path) == 3  # move, flat to the next time, up to the next value
    assert path[1].split(",")[1] == path[0].split(",")[1]
    quota = root.find(f"{ns}line[@class='quota']")
    assert quota is not None
    # The quota (4 GiB) is the top: its line sits at the top margin.
    assert float(quota.get("y1")) == 10.0
    assert [c.find(f"{ns}title").text for c in root.findall(f"{ns}circle")] == [
        "1970-01-01 00:00 UTC: 1 GiB",
        "1970-01-02 00:00 UTC: 2 GiB",
    ]


def test_one_point_is_drawn_in_the_middle() -> None:
    root = ET.fromstring(usage_chart([(5.0, 10)], None, "t"))
    circle = root.find("{http://www.w3.org/2000/svg}circle")
    assert float(circle.get("cx")) == 70 + (600 - 70 - 10) / 2


def test_history_keeps_one_entry_per_computation_and_is_bounded() -> None:
    figures = {"computed_at": 1.0, "projects": {"team/app": {"bytes": 5}}}
    history = appended_history(None, figures)
    history = appended_history(history, figures)  # the same computation again
    assert history == [{"at": 1.0, "projects": {"team/app": 5}}]
    for at in range(2, 500):
        history = appended_history(history, {"computed_at": float(at), "projects": {}})
    assert len(history) == 400 and history[-1]["at"] == 499.0
    assert project_history(history, "team/app")[-1] == (499.0, 0)
