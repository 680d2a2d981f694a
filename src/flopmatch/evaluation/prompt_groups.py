"""Prompt following per group of prompts on shapes: seen vs held-out, one vs two objects.

A prompt is **held-out** when it names a colour+shape combo of ``data.holdout`` or shows a shape
arrangement of ``data.holdout_relations`` (:func:`flopmatch.data.shapes.holdout_hits`): the model never
trained on an image of it, so its score there measures compositional generalisation, not recall. Every
other prompt is **seen**. Independently, a prompt is **one_object** or **two_object** by the number of
objects it names. ``held_out_combo`` / ``held_out_relation`` split the held-out prompts by why they are
held out (a prompt can be both); they are only reported when the data holds out that kind. With any
holdout, the crossed groups ``seen_one_object``, ``seen_two_object``, ``held_out_one_object`` and
``held_out_two_object`` are reported too: a held-out combo is twice as likely in a two-object prompt, so
held-out prompts are more often two-object ones, and a fair seen vs held-out comparison holds the
object count fixed.

Each group's scores have the fields of the overall score (:func:`flopmatch.evaluation.attributes.
summarise_checks`): attribute accuracies, ``full_match``, ``num_full_match``, ``num_checks`` and
``num_images`` (the group's n; 0 gives None scores).
"""

from __future__ import annotations

from flopmatch.data.shapes import holdout_hits, parse_caption
from flopmatch.evaluation.attributes import summarise_checks

GROUPS = ("seen", "held_out", "one_object", "two_object")  # always reported, n = 0 included
HELD_OUT_KINDS = ("held_out_combo", "held_out_relation")  # reported when the data holds out that kind
CROSSED = ("seen_one_object", "seen_two_object", "held_out_one_object", "held_out_two_object")  # with any holdout


def prompt_groups(prompts: list[str], holdout=(), holdout_relations=()) -> list[tuple[str, ...]]:
    """The groups of each prompt: "seen" or "held_out", "one_object" or "two_object", the crossed group
    (e.g. "held_out_two_object") and the held-out kinds that apply ("held_out_combo", "held_out_relation")."""
    out = []
    for prompt in prompts:
        attrs = parse_caption(prompt)
        combo, relation = holdout_hits(attrs, holdout, holdout_relations)
        tags = ["held_out" if combo or relation else "seen", "one_object" if attrs["count"] == 1 else "two_object"]
        tags.append(f"{tags[0]}_{tags[1]}")
        tags += [kind for kind, hit in zip(HELD_OUT_KINDS, (combo, relation)) if hit]
        out.append(tuple(tags))
    return out


def metrics_by_group(per_image_checks: list[dict[str, list[bool]]], groups: list[tuple[str, ...]],
                     names: tuple[str, ...] = GROUPS) -> dict[str, dict]:
    """{group: scores of the images in it} for each of ``names`` (a group with no image: n = 0, None scores).

    ``per_image_checks``: per image {attribute: [bool per check]}, as :func:`score_prompt_following`
    returns them; ``groups``: per image the groups it belongs to (:func:`prompt_groups`).
    """
    if len(per_image_checks) != len(groups):
        raise ValueError(f"{len(per_image_checks)} images but {len(groups)} group tags")
    return {name: summarise_checks([c for c, tags in zip(per_image_checks, groups) if name in tags]) for name in names}


def group_names(holdout=(), holdout_relations=()) -> tuple[str, ...]:
    """The groups an evaluation reports: :data:`GROUPS`, plus with any holdout :data:`CROSSED` and each
    held-out kind the data has."""
    kinds = tuple(kind for kind, held in zip(HELD_OUT_KINDS, (holdout, holdout_relations)) if held)
    return GROUPS + (CROSSED if kinds else ()) + kinds
