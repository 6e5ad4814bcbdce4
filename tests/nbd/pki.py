"""x509 credentials in QEMU's directory layout, made by openssl for the TLS tests."""
import os
import subprocess


def _run(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


def make_ca(d, cn):
    os.makedirs(d, exist_ok=True)
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
         "-days", "2", "-subj", f"/CN={cn}", cwd=d)
    return d


def make_cert(ca_dir, out_dir, role, cn="localhost"):
    """``{role}-cert.pem``/``{role}-key.pem`` in ``out_dir``, signed by the CA in ``ca_dir``; the CA's
    certificate is copied as ``ca-cert.pem``."""
    os.makedirs(out_dir, exist_ok=True)
    ext = os.path.join(out_dir, f"{role}.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                f"extendedKeyUsage={'serverAuth' if role == 'server' else 'clientAuth'}\n")
    _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{role}-key.pem", "-out", f"{role}.csr",
         "-subj", f"/CN={cn}", cwd=out_dir)
    _run("x509", "-req", "-in", f"{role}.csr", "-CA", os.path.join(ca_dir, "ca-cert.pem"),
         "-CAkey", os.path.join(ca_dir, "ca-key.pem"), "-CAcreateserial", "-out", f"{role}-cert.pem",
         "-days", "2", "-extfile", ext, cwd=out_dir)
    with open(os.path.join(ca_dir, "ca-cert.pem")) as src, open(os.path.join(out_dir, "ca-cert.pem"), "w") as dst:
        dst.write(src.read())
    return out_dir


def make_pki(base):
    """{"server": dir, "client": dir, "rogue": dir (a client whose CA is another one)}."""
    ca = make_ca(os.path.join(base, "ca"), "pyrep test CA")
    other = make_ca(os.path.join(base, "other-ca"), "another CA")
    return {"server": make_cert(ca, os.path.join(base, "server"), "server"),
            "client": make_cert(ca, os.path.join(base, "client"), "client"),
            "rogue": make_cert(other, os.path.join(base, "rogue"), "client")}
