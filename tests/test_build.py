"""The build follows the installed torch: the C++ standard its headers need, and the record of the build."""

import json
import os

import pytest
from torch.utils import cpp_extension

from fusenn import _cxx, dispatch


@pytest.mark.parametrize("guard, expected", [("#if __cplusplus < 202002L\n#error C++20 or later\n#endif\n", "c++20"),
                                             ("#if !defined(__cplusplus)\n#error C++\n#endif\n", "c++17")])
def test_cxx_std_reads_torchs_header(tmp_path, monkeypatch, guard, expected):
    header = tmp_path / "torch" / "csrc" / "api" / "include" / "torch" / "all.h"
    header.parent.mkdir(parents=True)
    header.write_text(guard + "#include <torch/types.h>\n")
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: [str(tmp_path)])
    assert _cxx.cxx_std() == expected


def test_cxx_std_matches_the_installed_torch():
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert _cxx.cxx_std() == ("c++20" if (major, minor) >= (2, 14) else "c++17")


def test_build_record_is_what_setup_wrote():
    """setup.py writes _build.json after the build; an installed fusenn._C matches the record it left."""
    path = os.path.join(os.path.dirname(dispatch.__file__), "_build.json")
    if not os.path.exists(path):
        pytest.fail("src/fusenn/_build.json is missing: fusenn was not installed through setup.py", pytrace=False)
    with open(path) as f:
        record = json.load(f)
    assert record == dispatch.build_record()
    try:
        from fusenn import _C
    except ImportError:
        assert not record["extension"], "the record claims an extension that does not import"
        return
    assert record["extension"], "fusenn._C imports but the record says none was built"
    assert _C.with_cuda == record["cuda_extension"]
