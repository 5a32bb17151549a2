#!/usr/bin/env python3
"""Writes the committed seed corpora in fuzz/seeds/ (run from anywhere; stdlib only).

The keys in fuzz/fixtures/ are throwaway test keys made with ssh-keygen and openssl for the
fuzz targets: never use them for anything. Seeds stay small (a few KB per target); the grown
corpus lives in fuzz/corpus/, which git ignores.
"""
import io
import json
import os
import shutil
import struct
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEEDS = os.path.join(HERE, "seeds")
FIX = os.path.join(HERE, "fixtures")
# The archive target's names, index by index with its fixtures.
NAMES = ["web-prod", "db-backup", "deploy-bot", "ci", "legacy"]
KEYS = ["ed25519", "ecdsa256", "rsa-pkcs1", "ecdsa384-pkcs8", "ec-sec1"]


def fixture(name):
    with open(os.path.join(FIX, name), "rb") as f:
        return f.read()


def write(target, name, data):
    os.makedirs(os.path.join(SEEDS, target), exist_ok=True)
    with open(os.path.join(SEEDS, target, name), "wb") as f:
        f.write(data)


def zip_of(entries, method=zipfile.ZIP_DEFLATED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = method
            z.writestr(info, data)
    return buf.getvalue()


def keys():
    for key in KEYS:
        write("keys", key, fixture(key))
    write("keys", "public-ed25519", fixture("ed25519.pub"))
    write("keys", "ed25519-crlf-bom", b"\xef\xbb\xbf" + fixture("ed25519").replace(b"\n", b"\r\n"))
    write("keys", "html", b"<html><body>502 Bad Gateway</body></html>")
    write("keys", "json", b'{"error_code":"KPS.6005","error_msg":"not hosted"}')


def archive():
    # Byte 0: bit 0 listing, bits 1-5 requested names, bit 6 structured; byte 1: listing shape.
    everything = 0b111110
    ed, ec, rsa = fixture("ed25519"), fixture("ecdsa256"), fixture("rsa-pkcs1")
    write("archive", "two-keys", bytes([0b000110, 0]) + zip_of([("web-prod.pem", ed), ("db-backup.pem", ec)]))
    write("archive", "folder-stored-listed", bytes([0b000111, 0b00011]) + zip_of(
        [("keypairs/web-prod.pem", ed), ("keypairs/db-backup", ec)], zipfile.ZIP_STORED))
    write("archive", "with-pub-and-readme", bytes([0b001011, 0b00101]) + zip_of(
        [("web-prod.pem", ed), ("web-prod.pub", fixture("ed25519.pub")), ("README.txt", b"keys\n"),
         ("deploy-bot.pem", rsa)]))
    write("archive", "unnamed-matched-by-listing", bytes([0b000111, 0b00011]) + zip_of(
        [("0001.pem", ed), ("0002.pem", ec)]))
    write("archive", "gap", bytes([everything, 0]) + zip_of([("ci.txt", fixture("ecdsa384-pkcs8"))]))
    write("archive", "empty", bytes([0b000010, 0]) + zip_of([]))
    write("archive", "traversal", bytes([0b000010, 0]) + zip_of([("../web-prod.pem", ed)]))
    write("archive", "structured", bytes([0b1000110, 0]) + bytes(range(0, 64)))


def manifest():
    for name in ["manifest.yaml", "production.yaml"]:
        with open(os.path.join(ROOT, "examples", name), "rb") as f:
            write("manifest", name, f.read())
    write("manifest", "small.yaml", b"""version: 1
kps:
  region: cn-north-4
  project_id: 0123456789abcdef0123456789abcdef
  auth:
    access_key_file: /nonexistent/ak
    secret_key_file: /nonexistent/sk
defaults: {mode: "0640", group: root}
keys:
  a: /srv/a.pem
  b: {path: b.pem, public_key: true, on_change: [systemctl, reload, nginx]}
""")


def kps_error():
    def seed(name, status, body):
        write("kps_error", name, struct.pack("<H", (status - 100) % 65536) + body)
    seed("not-found", 400, b'{"error_code":"KPS.6004","error_msg":"keypair not found"}')
    seed("not-hosted", 400, b'{"error_code":"KPS.6005","error_msg":"private key not hosted"}')
    seed("throttled", 429, b'{"error_code":"APIG.0308","error_msg":"The throttling threshold has been reached"}')
    seed("iam-nested", 401, b'{"error":{"code":401,"message":"The username or password is wrong.","title":"Unauthorized"}}')
    seed("camel", 403, b'{"errorCode":"KPS.9003","errorMsg":"no permission"}')
    seed("server", 500, b'{"code":"KPS.0003","message":"dependency failure"}')
    seed("html", 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>")


def kps_listing():
    def kp(i, **extra):
        with open(os.path.join(FIX, KEYS[i] + ".pub")) as f:
            public = f.read().strip()
        item = {"name": NAMES[i], "type": "ssh", "scope": "user", "public_key": public,
                "fingerprint": "", "is_key_protection": True, "frozen_state": 0}
        item.update(extra)
        return {"keypair": item}

    def page(items, marker):
        return json.dumps({"keypairs": items, "page_info": {"next_marker": marker,
                          "previous_marker": None, "current_count": len(items)}}).encode()

    write("kps_listing", "one-page", page([kp(0), kp(1, frozen_state="1")], None))
    write("kps_listing", "two-pages", page([kp(0)], "web-prod") + b"\xff" + page([kp(3, is_key_protection=False)], None))
    write("kps_listing", "loop", page([kp(0)], "a") + b"\xff" + page([kp(1)], "a"))
    write("kps_listing", "md5", page([kp(4, public_key=None, fingerprint="MD5:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99")], None))


def sign():
    # The target's input is `arbitrary`-structured: any bytes are a valid input. These few
    # give it a start with the strings it meets in real requests.
    write("sign", "get-listing", b"GET\x01\x00/v3/0123456789abcdef0123456789abcdef/keypairs\x00limit\x0050\x00marker\x00abc")
    write("sign", "post-export", b"POST\x02\x01\x01/v3/p/keypairs/private-key/export\x00content-type\x00application/json;charset=utf-8")


if __name__ == "__main__":
    shutil.rmtree(SEEDS, ignore_errors=True)
    for make in [keys, archive, manifest, kps_error, kps_listing, sign]:
        make()
