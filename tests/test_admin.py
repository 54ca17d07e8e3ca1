import pytest

from nirvana import admin


KEY = "k" * 20


def test_check_key_accepts_http_and_grpc_header_names():
    admin.check_key({admin.ADMIN_HEADER: KEY}, KEY)
    admin.check_key({admin.GRPC_ADMIN_HEADER: KEY}, KEY)


@pytest.mark.parametrize("parameters", [{}, {admin.ADMIN_HEADER: "wrong"}, {admin.ADMIN_HEADER: 7},
                                        {"other": KEY}, {admin.ADMIN_HEADER: KEY + "x"}])
def test_check_key_refuses_missing_or_wrong_keys(parameters):
    with pytest.raises(admin.Unauthorized, match=admin.ADMIN_HEADER):
        admin.check_key(parameters, KEY)


def test_without_a_server_key_everything_is_refused():
    with pytest.raises(admin.Unauthorized, match="off"):
        admin.check_key({admin.ADMIN_HEADER: ""}, None)
    assert admin.server_key({}) is None
    assert admin.server_key({admin.ADMIN_KEY_ENV: f" {KEY}\n"}) == KEY


@pytest.mark.parametrize("key", ["short", "has space in it......", "a:b=c,d" * 4, "é" * 20])
def test_validate_key_rejects_keys_triton_flags_cannot_carry(key):
    with pytest.raises(ValueError, match="admin key"):
        admin.validate_key(key)


def test_triton_args_restrict_and_forward_the_same_header():
    args = admin.triton_args(KEY, ("model-repository", "logging"))
    assert f"--http-restricted-api=model-repository,logging:{admin.ADMIN_HEADER}={KEY}" in args
    assert f"--grpc-restricted-protocol=model-repository,logging:{admin.ADMIN_HEADER}={KEY}" in args
    forward = [a for a in args if "header-forward-pattern" in a]
    assert len(forward) == 2 and all(admin.GRPC_ADMIN_HEADER in a and "|" in a for a in forward)
    assert not any("restricted" in a for a in admin.triton_args(KEY, ()))
