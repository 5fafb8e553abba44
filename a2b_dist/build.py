"""Build WebDataset shards + manifest.json per role; the format is in shards/README.md.

`a2b build` (`a2b upload` and `a2b verify` are its upload and verify subcommands); `python
shards/build.py` (the path shards/README.md documents) runs this same command.

    a2b build simulated --source mnist5k --size 32 --out data/demo --seed 0
    a2b build simulated --source phantom --anomaly lesion --size 64 --out data/phantom --seed 0
    a2b build simulated --source cthead --anomaly hemorrhage --size 64 --out data/cthead --seed 0
    a2b build folder --images xrays/normal --role healthy --out data/xray --size 256 --channels 1
    a2b build folder --images xrays/test --labels xrays/test.csv --role test --out data/xray --size 256 --channels 1
    a2b build npz --file pneumoniamnist.npz --images-key train_images --labels-key train_labels \
        --out data/pneumonia --size 28 --channels 1 --split healthy=0.4,mixed=0.4,val=0.05,test=0.15
    a2b build dicom --images scans/ --labels scans/labels.csv --out data/cxr --size 256 --channels 1 \
        --split healthy=0.4,mixed=0.4,val=0.05,test=0.15 --window 2048,4096
    a2b build split --images ChestX-ray8/images --labels cxr8.csv --group-column patient \
        --out data/cxr8 --size 256 --channels 1 --split healthy=0.4,mixed=0.4,val=0.05,test=0.15
    a2b build nifti --volumes brains/ --labels brains/labels.csv --axis 2 --out data/brain \
        --size 128 --channels 1 --split healthy=0.4,mixed=0.4,val=0.05,test=0.15
    a2b verify data/xray            # every shard's size, count and sha256
    a2b build simulated --source mnist5k --size 32 --out s3://bucket/demo   # built, then uploaded
    a2b upload data/xray s3://bucket/xray    # a local build to object storage
    a2b verify s3://bucket/xray             # read back once, sha256 of every shard

Each role lands in OUT/<role>/ all at once: a failed build leaves no output folder behind. An
--out URL (s3://, gs://) is built in a local staging folder, then uploaded with each role's
manifest after all of its shards, so readers never see a role whose shards are not all there.
Credentials come from the environment or the provider's config files, never from the URL.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from a2b_dist.data.manifest import ROLES, DataError, verify_roles
from a2b_dist.sources.medical import SliceRule, dicom_roles, listed_roles, nifti_roles, parse_window, write_skipped
from a2b_dist.sources.simulate import ANOMALIES, SOURCES, simulated_roles
from a2b_dist.sources.folders import folder_role, npz_roles
from a2b_dist.data.storage import FieldError, Storage, check_location, is_url, join
from a2b_dist.data.write import WriteSpec, check_upload_target, upload_roles, write_roles
from a2b_dist.errors import number_arg


def local_path(text: str) -> Path:
    """An input file or folder: a local path (a URL is refused by the one location check, its
    credentials never echoed)."""
    try:
        return Path(check_location(text, "", local="this command reads local files; build from a local copy"))
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The library names its arguments (a2b_dist.data.storage.FieldError); this command says its flags.
# An argument missing here is its flag with - for _ (group_column: --group-column); None: a
# positional argument, said by its value alone.
FLAGS = {"images_dir": "--images", "labels_csv": "--labels", "volumes_dir": "--volumes", "out_root": "--out",
         "url": None}


def flag_name(argument: str, value: str | None) -> str:
    """How this command names a library argument in a message: ``--images X``, ``--overwrite``."""
    flag = FLAGS.get(argument, "--" + argument.replace("_", "-"))
    if flag is None:
        return argument if value is None else value
    return flag if value in (None, "True") else f"{flag} {value}"   # a switch (overwrite=True) is its flag


def message(exc: DataError) -> str:
    """A library error as this command's users read it: its arguments named by their flags."""
    return exc.render(flag_name) if isinstance(exc, FieldError) else str(exc)


positive_int = number_arg(1, None, integer=True)
seed_int = number_arg(0, None, integer=True)


def byte_size(text: str) -> int:
    """'500000000', '500M', '1G' -> bytes."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9}
    try:
        if text[-1:].lower() in units:
            value = int(float(text[:-1]) * units[text[-1].lower()])
        else:
            value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 1000000, 500M, 1G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1 byte")
    return value


def pair_of_floats(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two numbers LOW,HIGH") from None
    return low, high


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1]")
    return value


def unit_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return value


class Parser(argparse.ArgumentParser):
    """argparse that prints one line, names the argument, and exits 2 (no usage dump)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "a2b build") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def common(sub, channels: bool = True) -> None:
        sub.add_argument("--out", required=True,
                         help="folder that receives one subfolder per role, or an s3:// or gs:// URL to upload to")
        sub.add_argument("--size", required=True, type=positive_int, help="side of the square images, px")
        if channels:
            sub.add_argument("--channels", required=True, type=int, choices=(1, 3))
        sub.add_argument("--seed", type=seed_int, default=0, help="shuffles the sample order (and splits)")
        sub.add_argument("--maxcount", type=positive_int, default=1000, help="samples per shard at most")
        sub.add_argument("--maxsize", type=byte_size, default=1_000_000_000, help="bytes per shard at most (1G)")
        sub.add_argument("--overwrite", action="store_true", help="replace existing role folders")

    folder = commands.add_parser("folder", help="image files (PNG, JPEG, TIFF) found recursively")
    folder.add_argument("--images", required=True, type=local_path)
    folder.add_argument("--labels", type=local_path, help="CSV with columns path,label[,mask]; required for val/test")
    folder.add_argument("--role", required=True, choices=ROLES)
    common(folder)

    npz = commands.add_parser("npz", help="arrays in an .npz (MedMNIST layout)")
    npz.add_argument("--file", required=True, type=local_path)
    npz.add_argument("--images-key", required=True)
    npz.add_argument("--labels-key", required=True)
    npz.add_argument("--split", default="healthy=0.4,mixed=0.4,val=0.05,test=0.15",
                     help="role=count or role=fraction (of all samples), comma-separated")
    common(npz)

    group_split = ("whole groups per role: role=count or role=fraction (of all groups), comma-separated; "
                   "no group (patient, volume) lands in two roles")
    dicom = commands.add_parser("dicom", help="DICOM files (pydicom), split into roles by patient")
    dicom.add_argument("--images", required=True, type=local_path, help="folder searched recursively for .dcm/.dicom")
    dicom.add_argument("--labels", type=local_path,
                       help="CSV with columns path,label[,mask][,GROUP]; required for val/test; its rows are the samples")
    dicom.add_argument("--group-column", help="CSV column holding the patient (default: the header's PatientID)")
    dicom.add_argument("--window", help="CENTRE,WIDTH on the rescaled values (default: the file's window, "
                                        "else each image's range)")
    dicom.add_argument("--bit-depth", type=int, choices=(8, 16), default=16, help="stored levels (default 16)")
    dicom.add_argument("--split", default="healthy=0.4,mixed=0.4,val=0.05,test=0.15", help=group_split)
    dicom.add_argument("--strict", action="store_true",
                       help="stop at the first file that is not a readable single-frame image, or has no PatientID "
                            "(default: skip it, count it, list it in OUT/dicom-skipped.csv)")
    common(dicom)

    listed = commands.add_parser("split", help="image files listed in a CSV with a group column, split by group")
    listed.add_argument("--images", required=True, type=local_path, help="folder the CSV's paths are relative to")
    listed.add_argument("--labels", required=True, type=local_path, help="CSV with columns path,label,GROUP[,mask]")
    listed.add_argument("--group-column", required=True, help="CSV column holding the group (e.g. patient)")
    listed.add_argument("--split", default="healthy=0.4,mixed=0.4,val=0.05,test=0.15", help=group_split)
    common(listed)

    nifti = commands.add_parser("nifti", help="NIfTI volumes (nibabel) cut into 2-D slices, split by volume")
    nifti.add_argument("--volumes", required=True, type=local_path, help="folder searched recursively for .nii/.nii.gz")
    nifti.add_argument("--labels", type=local_path, help="CSV with columns path,label[,mask] per volume; "
                                                   "a mask volume labels each slice")
    nifti.add_argument("--axis", type=int, choices=(0, 1, 2), default=2,
                       help="slice axis after reorientation to RAS: 0 sagittal, 1 coronal, 2 axial (default)")
    nifti.add_argument("--percentiles", type=pair_of_floats, default=(0.5, 99.5),
                       help="LOW,HIGH per-volume percentiles mapped to 0 and 1 (default 0.5,99.5)")
    nifti.add_argument("--foreground-level", type=share, default=0.1,
                       help="a pixel is foreground above this normalised value (default 0.1)")
    nifti.add_argument("--min-foreground", type=share, default=0.05,
                       help="a slice is kept with at least this share of foreground pixels (default 0.05)")
    nifti.add_argument("--bit-depth", type=int, choices=(8, 16), default=16, help="stored levels (default 16)")
    nifti.add_argument("--split", default="healthy=0.4,mixed=0.4,val=0.05,test=0.15", help=group_split)
    common(nifti)

    sim = commands.add_parser("simulated", help="simulated anomalies (the paper's section 4.3 squares by default) "
                                                "on packaged digits, a procedural head phantom, or slices of a real "
                                                "head CT (Debian's invesalius-examples)")
    sim.add_argument("--source", required=True, choices=SOURCES)
    sim.add_argument("--anomaly", choices=ANOMALIES,
                     help="kind of anomaly (default: square; lesion for --source phantom and cthead; lesion and "
                          "hemorrhage need one of those heads)")
    sim.add_argument("--count", type=positive_int,
                     help="--source phantom: number of heads generated; --source cthead: number of augmented slices "
                          "in all, divided among the roles (default 5000 each)")
    sim.add_argument("--scale", type=unit_fraction, default=1.0, help="shrink every role (small test sets)")
    sim.add_argument("--mixed-fraction", type=float, metavar="F",
                     help="anomalous share of the mixed role, same size (default: the paper's 0.3; 0: healthy "
                          "images only); the healthy, val and test roles do not change")
    common(sim, channels=False)

    verify = commands.add_parser("verify", help="check every shard against its manifest: size, sample count, sha256")
    verify.add_argument("folders", nargs="+", metavar="DIR",
                        help="a role folder (holding manifest.json) or a data root holding role folders; "
                             "a URL is read once")

    upload = commands.add_parser("upload", help="copy a built data root to object storage, manifests last")
    upload.add_argument("source", type=local_path, metavar="DIR", help="a data root written by this script")
    upload.add_argument("target", metavar="URL", help="s3://bucket/prefix or gs://bucket/prefix")
    upload.add_argument("--overwrite", action="store_true", help="replace roles already there")
    return parser


def upload(source: Path, target: str, overwrite: bool, prog: str = "a2b") -> int:
    try:
        check_location(target, "upload URL")   # credentials refused before anything is read
        upload_roles(source, target, overwrite=overwrite, storage=Storage(), report=print)
    except DataError as exc:
        print(f"{prog} upload: error: {message(exc)}", file=sys.stderr)
        return 2
    return 0


def verify(folders: list[str], prog: str = "a2b") -> int:
    """Print one line per role (and one per damaged shard); 0 when every shard matches, else 1."""
    bad = 0
    for folder in folders:
        try:
            check_location(folder, "verify DIR")   # credentials in a URL refused, never echoed
            results = verify_roles(folder)
        except DataError as exc:
            print(f"{prog} verify: error: {message(exc)}", file=sys.stderr)
            return 2
        for role_dir, manifest, problems in results:
            if problems:
                bad += len(problems)
                print(f"{role_dir}: DAMAGED ({len(problems)} problem{'s' * (len(problems) > 1)})")
                for problem in problems:
                    print(f"  {problem}")
            else:
                n = len(manifest['shards'])
                print(f"{role_dir}: ok, {n} shard{'s' * (n != 1)}, {manifest['samples']} samples, "
                      "sizes, counts and sha256 match the manifest")
    if bad:
        print(f"{prog} verify: {bad} problem{'s' * (bad > 1)} found; rebuild the damaged roles "
              "(or train with data.skip_corrupt=true to skip what cannot be read)", file=sys.stderr)
    return 1 if bad else 0


class Terminated(BaseException):
    """SIGTERM (scancel, a time limit) as an exception, so that the staging folders are removed.
    A BaseException: no ``except Exception`` in a reader may swallow it."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None, prog: str = "a2b build") -> int:
    """``prog``: the name the messages and the manifests' ``command`` give this command
    (``shards/build.py`` when run by that path; ``a2b`` for ``a2b upload`` and ``a2b verify``)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog).parse_args(argv)
    if args.command == "verify":
        return verify(args.folders, prog)
    if args.command == "upload":
        return upload(args.source, args.target, args.overwrite, prog)
    try:
        check_location(args.out, "--out")
    except DataError as exc:
        print(f"{prog} {args.command}: error: {message(exc)}", file=sys.stderr)
        return 2
    remote, storage = is_url(args.out), Storage()
    out = Path(tempfile.mkdtemp(prefix="a2b-build-")) / "data" if remote else Path(args.out)
    command = shlex.join([*(["python"] if prog.endswith(".py") else []), *prog.split(), *argv])
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if args.command == "folder":
            spec, source, bit_depth = folder_role(
                args.images, role=args.role, size=args.size, channels=args.channels, labels_csv=args.labels, seed=args.seed
            )
            roles, channels = {args.role: spec}, args.channels
        elif args.command == "npz":
            roles, source, bit_depth = npz_roles(
                args.file, images_key=args.images_key, labels_key=args.labels_key,
                size=args.size, channels=args.channels, split=args.split, seed=args.seed,
            )
            channels = args.channels
        elif args.command == "dicom":
            roles, source, bit_depth, scan = dicom_roles(
                args.images, size=args.size, channels=args.channels, split=args.split, labels_csv=args.labels,
                group_column=args.group_column, window=parse_window(args.window), bit_depth=args.bit_depth,
                seed=args.seed, strict=args.strict,
            )
            channels = args.channels
        elif args.command == "split":
            roles, source, bit_depth = listed_roles(
                args.images, labels_csv=args.labels, group_column=args.group_column, size=args.size,
                channels=args.channels, split=args.split, seed=args.seed,
            )
            channels = args.channels
        elif args.command == "nifti":
            rule = SliceRule(args.percentiles, args.foreground_level, args.min_foreground)
            roles, source, bit_depth = nifti_roles(
                args.volumes, size=args.size, channels=args.channels, split=args.split, axis=args.axis,
                labels_csv=args.labels, rule=rule, bit_depth=args.bit_depth, seed=args.seed,
            )
            channels = args.channels
        else:
            roles, source = simulated_roles(args.source, args.size, args.seed, args.scale,
                                            anomaly=args.anomaly, count=args.count,
                                            mixed_fraction=args.mixed_fraction)
            bit_depth, channels = 8, 1
        if remote:   # fail before the build when the target already holds a role
            check_upload_target(args.out, roles, overwrite=args.overwrite, storage=storage)
        spec = WriteSpec(image_size=args.size, channels=channels, bit_depth=bit_depth, source=source, seed=args.seed,
                         command=command, maxcount=args.maxcount, maxsize=args.maxsize, overwrite=args.overwrite)
        manifests = write_roles(out, roles, spec)
        notes = []
        if args.command == "dicom":
            listed = write_skipped(out, scan)
            notes = scan.summary() + ([f"the skipped files and why: {listed}"] if listed else [])
        if remote:   # staged in $TMPDIR, then uploaded; the staging folder goes in any case
            upload_roles(out, args.out, roles=list(manifests), overwrite=args.overwrite, storage=storage,
                         report=notes.append)
            if args.command == "dicom" and listed:
                storage.upload(listed, join(args.out, listed.name))
                notes = [n.replace(str(listed), join(args.out, listed.name)) for n in notes]
    except DataError as exc:
        print(f"{prog} {args.command}: error: {message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable --out, disk full: the message names the file
        print(f"{prog} {args.command}: error: {exc.strerror if exc.filename is None and exc.strerror else exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: stopped by SIGTERM; no output written", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        if remote:
            shutil.rmtree(out.parent, ignore_errors=True)
    for role, manifest in manifests.items():
        labels = ", ".join(f"{k}: {v}" for k, v in manifest["labels"].items())
        groups = f", {len(manifest['groups'])} {manifest.get('group_by', 'group')} groups" if "groups" in manifest else ""
        print(f"{join(args.out, role)}: {manifest['samples']} samples ({labels}){groups}, {len(manifest['shards'])} shards")
    for note in notes:
        print(note)
    print(f"built in {time.perf_counter() - started:.1f} s")
    return 0

