import pytest

from stepopsd.analysis import read_metrics, validation


def test_read_metrics_skips_empty_cells_and_takes_the_latest_version(tmp_path):
    for version, value in ((0, "9"), (1, "0.5")):
        d = tmp_path / "csv" / f"version_{version}"
        d.mkdir(parents=True)
        (d / "metrics.csv").write_text("actor/pg_loss,epoch,step,val_generated/valid_seen/success\n"
                                       f",,0,{value}\n0.25,0,0,\n-0.5,1,1,\n,,2,0.75\n")
    m = read_metrics(str(tmp_path))
    assert m["actor/pg_loss"] == [(0, 0.25), (1, -0.5)]
    assert validation(str(tmp_path)) == {"val_generated/valid_seen/success": [(0, 0.5), (2, 0.75)]}


def test_a_folder_without_metrics_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory"):
        read_metrics(str(tmp_path))
