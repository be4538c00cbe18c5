from glob import glob

from setuptools import find_packages, setup

setup(
    name="lbctl",
    version="0.1.0",
    description="eBPF load balancer for Kubernetes Services (a kube-proxy replacement)",
    python_requires=">=3.11",
    packages=find_packages(include=["lbctl", "lbctl.*"]),
    # The C sources are compiled at run time by bcc; installed copies live here.
    data_files=[("share/lbctl/bpf", sorted(glob("bpf/*.[ch]")))],
    install_requires=[
        "cffi>=1.15",
        "kubernetes>=28",
        "prometheus-client>=0.17",
        "pyroute2>=0.7",
        "PyYAML>=6",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "mypy>=1.8",
            "ruff>=0.4",
            "types-PyYAML",
            # the Kubernetes API schemas deploy/ is checked against (tests/test_deploy.py)
            "kubernetes-validate>=1.37",
            # `lbctl status -o json` checked against docs/status-v1.schema.json
            "jsonschema>=4.17",
            # property-based generation of malformed objects (tests/test_reliability_input.py)
            "hypothesis>=6.100",
            # the import layers of lbctl/ (cli -> agent -> sources, datapath -> plan -> model)
            "import-linter>=2",
        ],
    },
    entry_points={"console_scripts": ["lbctl=lbctl.cli.main:main"]},
)
