import pyarrow as pa
import pytest

import schemas


def test_pair_schema_has_the_contract_fields():
    pair = schemas.load("pair")
    assert pair.id == "pair_v1"
    for prefix in ("cond", "target"):
        for name in ("image_id", "url", "sha256", "width", "height", "image", "embedding"):
            assert f"{prefix}_{name}" in pair.names
    for name in ("pair_id", "episode_id", "page_url", "similarity", "encoder"):
        assert name in pair.names


@pytest.mark.parametrize("table", ["pair", "image", "similarity", "reject"])
def test_arrow_schema_is_derived_with_its_id(table):
    schema = schemas.load(table)
    arrow = schema.arrow()
    assert arrow.names == schema.names
    assert schemas.schema_id_of(arrow) == schema.id


def test_types_map_as_documented():
    arrow = schemas.load("pair").arrow()
    assert arrow.field("cond_embedding").type == pa.list_(pa.float32())
    assert arrow.field("similarity").type == pa.float32()
    assert arrow.field("cond_image").type == pa.binary()
    spec = schemas.load("pair").tf_feature_spec()
    assert spec["cond_embedding"] == ("VarLenFeature", "float32")
    assert spec["cond_width"] == ("FixedLenFeature", "int64")


def test_unknown_schema():
    with pytest.raises(KeyError, match="known"):
        schemas.load("pair_v99")
