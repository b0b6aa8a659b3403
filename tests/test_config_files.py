"""Config and campaign files share one reader: each way a YAML file can be wrong is one error naming it."""

import pytest

from towerline.config import load_config
from towerline.errors import ConfigError
from towerline.marketing.campaign_config import load_campaign


@pytest.mark.parametrize("loader, kind", [(load_config, "config"), (load_campaign, "campaign")])
def test_a_missing_file_is_named_with_its_kind(tmp_path, loader, kind):
    with pytest.raises(ConfigError, match=f"{kind} file not found: .*nope.yaml"):
        loader(tmp_path / "nope.yaml")


@pytest.mark.parametrize("loader", [load_config, load_campaign])
def test_broken_yaml_names_the_file(tmp_path, loader):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        loader(bad)


@pytest.mark.parametrize("loader, keys", [(load_config, "sections"), (load_campaign, "name, trigger")])
def test_a_list_at_the_top_level_says_what_the_mapping_holds(tmp_path, loader, keys):
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match=f"list.yaml: top level must be a mapping of {keys}"):
        loader(listed)
