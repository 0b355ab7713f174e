from datamodules.captions import select_caption
from datamodules.shards import budget_counts, read_index
from datamodules.world import PLACES, WorldConfig, caption, make_scene, render
from stages.metrics import mentions


def test_scenes_are_a_pure_function_of_seed_split_and_index():
    config = WorldConfig()
    a, b = make_scene(config, 3, "train", 17), make_scene(config, 3, "train", 17)
    assert a.metadata() == b.metadata()
    assert render(a, 64, 3).tobytes() == render(b, 64, 3).tobytes()
    assert make_scene(config, 4, "train", 17).metadata() != a.metadata()


def test_every_caption_names_only_objects_that_are_there():
    config = WorldConfig(max_objects=4)
    for index in range(200):
        scene = make_scene(config, 0, "train", index)
        assert 1 <= len(scene.objects) <= 4
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        truth = {(o.colour, o.shape) for o in scene.objects}
        for kind in ("short", "medium", "long"):
            named = {(m.colour, m.shape) for m in mentions(caption(scene, kind))}
            assert named <= truth
        assert {(m.colour, m.shape) for m in mentions(caption(scene, "long"))} == truth
        assert all(o.place in caption(scene, "long") for o in scene.objects)
        assert all(o.place in PLACES for o in scene.objects)


def test_captions_grow_with_their_kind():
    scene = make_scene(WorldConfig(), 0, "train", 5)
    words = scene.metadata()["caption_words"]
    assert words["short"] <= words["medium"] < words["long"]


def test_select_caption_takes_the_longest_variant_within_budget():
    captions = {"short": "a red circle", "medium": "a red circle on a gray background", "long": " ".join(["w"] * 20)}
    assert select_caption(captions, 3) == "a red circle"
    assert select_caption(captions, 10) == "a red circle on a gray background"
    assert select_caption(captions, 20) == captions["long"]
    assert select_caption(captions, 2) is None


def test_world_shards_have_per_shard_counts_and_budget_counts(micro_world):
    index = read_index(micro_world)
    assert [s["count"] for s in index["splits"]["train"]] == [64, 64, 64]
    assert sum(s["count"] for s in index["splits"]["test"]) == 24
    for shard in index["splits"]["train"]:
        assert (micro_world / shard["url"]).is_file()
    kept, skipped = budget_counts(index, "train", 2)
    assert kept == 0 and skipped == 192  # the shortest caption, "a red circle", has 3 words
    kept, skipped = budget_counts(index, "train", 7)
    assert kept + skipped == 192 and kept > 0
