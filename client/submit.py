"""``densecap submit DIR --server https://host:8443 --token T --output OUT``: caption a folder on a gateway.

What it does, in order (REST API in ``docs/jobs-api.md``):

1. lists DIR's files recursively (skipping dotfiles, dot-folders and OUT itself) and hashes them (sha256);
2. skips images whose result is already in ``OUT/results.jsonl`` with the same hash (a re-run resumes);
3. reuses the job recorded in ``OUT/job.json`` (or creates one), sends the manifest of names and hashes,
   and uploads, in parallel, only the bytes the server does not already hold or has not already captioned;
4. seals the job; with ``--no-wait`` prints the job id and stops here;
5. follows the results as they arrive: one JSON line per image appended to ``OUT/results.jsonl``, the image
   resized for the viewer at ``OUT/<name>`` and, with ``--draw``, the boxes drawn in ``OUT/drawn/<name>``;
6. writes ``OUT/results.json`` in the original viewer format (``densecap view OUT`` shows it).

A file the server cannot use (not an image, corrupt, too large) gets an error line and is listed under
``"errors"`` in results.json; the others go on. Exit status: 0 done (errors included), 1 usage, network
or server error, 3 job canceled. Torch-free.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from client.jobs_client import ApiError, JobsClient, UploadFile
from densecap_core.jobs import BadItem, validate_item_name
from densecap_core.schema import ImageResult, viewer_document

#: Extensions a browser shows; other images are saved for the viewer as ``<name>.jpg``.
VIEWER_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
#: Per-part allowance for multipart headers when packing files into one upload request.
PART_OVERHEAD_BYTES = 1024
#: Pause between result polls that found nothing new. The last result of a job is seen at most this late
#: (at 0.5 s that tail was 15% of a 64-image job on the CPU); an empty poll costs the gateway about 1 ms.
POLL_S = 0.1
#: Waiting this long without a new result prints a hint (no job worker running?).
STALL_NOTICE_S = 120.0
#: The original run_model.lua's -image_size, used when the job does not say which size its model saw.
DEFAULT_IMAGE_SIZE = 720


@dataclass
class LocalImage:
    name: str  # relative to DIR, '/'-separated: the item name on the server
    path: Path
    size: int
    sha256: str = ""


# --- the command -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="folder of images (searched recursively; dotfiles skipped)")
    parser.add_argument("--server", required=True, help="gateway URL, e.g. https://host:8443")
    parser.add_argument("--token", default=os.environ.get("DENSECAP_TOKEN", ""),
                        help="API token (default: $DENSECAP_TOKEN; on the gateway host it is in var/token)")
    parser.add_argument("--output", "-o", type=Path, required=True,
                        help="output folder: results.json, results.jsonl, viewer images, job.json")
    parser.add_argument("--draw", action="store_true", help="also write images with boxes drawn in, to OUT/drawn/")
    parser.add_argument("--num-to-draw", type=int, default=10, help="boxes per drawn image (with --draw)")
    parser.add_argument("--no-wait", action="store_true", help="upload, print the job id and exit")
    parser.add_argument("--cancel", action="store_true",
                        help="cancel the job recorded in OUT/job.json (uploads nothing) and exit")
    parser.add_argument("--new-job", action="store_true",
                        help="start a new job instead of resuming the one in OUT/job.json (errors are retried)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--ca-cert", type=Path, help="trust this certificate (e.g. the gateway's var/tls/cert.pem)")
    tls.add_argument("--insecure", action="store_true", help="do not verify the gateway's TLS certificate")
    parser.add_argument("--parallel", type=int, default=4, help="uploads in flight at once")
    parser.add_argument("--image-size", type=int, default=None, metavar="PX",
                        help="long side of the images saved for the viewer (default: the model's image_size, "
                             "as `densecap caption` and the original run_model.lua save them)")
    parser.add_argument("--label", default="", help="a label for the job (shown on the jobs page)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if not args.token:
        return _fail("no API token: pass --token or set DENSECAP_TOKEN (the gateway host keeps it in var/token)")
    root = args.dir
    if not root.is_dir():
        return _fail(f"{root} is not a folder")
    out = args.output
    if out.resolve() == root.resolve():
        return _fail("--output must not be the input folder: it would mix results with your images")
    if args.insecure:
        import urllib3
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    verify: bool | str = False if args.insecure else (str(args.ca_cert) if args.ca_cert else True)
    client = JobsClient(args.server, args.token, verify=verify,
                        notice=lambda text: tqdm.write(f"densecap submit: {text}", file=sys.stderr))
    try:
        if args.cancel:
            return cancel_recorded_job(client, OutputFolder(out))
        return Submission(client, root, out, args).run()
    except ApiError as exc:
        return _fail(str(exc))
    except BadItem as exc:
        return _fail(exc.message)


def cancel_recorded_job(client: JobsClient, out: "OutputFolder") -> int:
    job = out.load_job()
    if not job:
        return _fail(f"no job recorded in {out.path / 'job.json'}; nothing to cancel")
    status = client.cancel(job["id"])
    print(f"densecap submit: job {job['id']} canceled ({status['counts']['done']} of "
          f"{status['counts']['images']} images had results)", file=sys.stderr)
    return 0


def _fail(message: str) -> int:
    print(f"densecap submit: {message}", file=sys.stderr)
    return 1


# --- one run ---------------------------------------------------------------------------------------------


class Submission:
    def __init__(self, client: JobsClient, root: Path, out: Path, args: argparse.Namespace):
        self.client, self.root, self.args = client, root, args
        self.out = OutputFolder(out, image_size=args.image_size, draw=args.draw, num_to_draw=args.num_to_draw)
        self.quiet = args.quiet

    def bar(self, **kwargs) -> tqdm:
        return tqdm(disable=self.quiet, file=sys.stderr, dynamic_ncols=True, **kwargs)

    def run(self) -> int:
        images = scan_folder(self.root, exclude=self.out.path)
        if not images:
            return _fail(f"{self.root} holds no files to caption (dotfiles are skipped)")
        self.hash_all(images)
        self.out.path.mkdir(parents=True, exist_ok=True)
        known = self.out.load_records()
        # Local results count when their bytes still match; with --new-job only successes count.
        known = {name: rec for name, rec in known.items() if not (self.args.new_job and rec.get("error"))}
        todo = [im for im in images if known.get(im.name, {}).get("sha256") != im.sha256]
        job = self.open_job()
        job_id = job["id"]
        self.out.save_job({"id": job_id, "server": self.client.server, "dir": str(self.root.resolve())})
        if todo:
            self.upload(job_id, job["limits"], todo)
        self.client.seal(job_id)
        if self.args.no_wait:
            print(job_id)
            return 0
        state = self.follow(job_id, images, known)
        if state == "canceled":
            print(f"densecap submit: job {job_id} was canceled; results so far are in {self.out.path}",
                  file=sys.stderr)
            return 3
        return self.finish(job_id, images)

    def hash_all(self, images: list[LocalImage]) -> None:
        with self.bar(total=len(images), desc="hash", unit="file") as bar, ThreadPoolExecutor(4) as pool:
            for image, sha in zip(images, pool.map(lambda im: sha256_file(im.path), images)):
                image.sha256 = sha
                bar.update(1)

    def open_job(self) -> dict[str, Any]:
        """The job in OUT/job.json when it is on this server and still usable, else a new one."""
        previous = self.out.load_job()
        if previous and not self.args.new_job and previous.get("server") == self.client.server:
            try:
                status = self.client.status(previous["id"])
                if status["state"] != "canceled":
                    return status
            except ApiError as exc:
                if exc.status != 404:
                    raise
        return self.client.create_job(self.args.label or self.root.resolve().name)

    def upload(self, job_id: str, limits: dict[str, int], todo: list[LocalImage]) -> None:
        statuses: dict[str, str] = {}
        step = int(limits.get("max_manifest_items", 5000))
        for start in range(0, len(todo), step):
            items = [{"name": im.name, "sha256": im.sha256, "size": im.size} for im in todo[start:start + step]]
            for item in self.client.manifest(job_id, items):
                statuses[item["name"]] = item["status"]
        by_hash: dict[str, LocalImage] = {}
        for im in todo:
            if statuses.get(im.name) == "need":
                by_hash.setdefault(im.sha256, im)  # equal bytes are uploaded once; the other names share it
        need = list(by_hash.values())
        batches = pack_uploads(need, int(limits["chunk_size"]), int(limits["max_request_bytes"]))
        with self.bar(total=len(need), desc="upload", unit="img") as bar, \
                ThreadPoolExecutor(max(1, self.args.parallel)) as pool:
            def send(batch: list[LocalImage]) -> int:
                self.client.upload(job_id, [UploadFile(im.name, im.path.read_bytes()) for im in batch])
                return len(batch)
            for n in pool.map(send, batches):
                bar.update(n)

    def follow(self, job_id: str, images: list[LocalImage], known: dict[str, dict]) -> str:
        """Fetch results until the job is finished (or canceled); returns the final state."""
        wanted = {im.name: im for im in images}
        done = {name for name, rec in known.items() if name in wanted and rec.get("sha256") == wanted[name].sha256}
        have = set(done)  # already in results.jsonl: not appended again
        cursor = 0
        with self.bar(total=len(images), initial=len(done), desc="caption", unit="img") as bar, \
                ThreadPoolExecutor(1) as post:
            last_status = last_progress = time.monotonic()
            warned = False
            while True:
                page = self.client.results(job_id, cursor, 1000)
                if page["results"] and self.out.image_size is None:
                    self.out.image_size = image_size_of(self.client.status(job_id))
                for record in page["results"]:
                    image = wanted.get(record["name"])
                    if image is None or record.get("sha256") != image.sha256:
                        continue  # an item of this job that is no longer in the folder
                    if record["name"] in have:
                        continue
                    have.add(record["name"])
                    self.out.append_record(record)
                    post.submit(self.out.write_images, record, image.path)
                    if record["name"] not in done:
                        done.add(record["name"])
                        bar.update(1)
                if page["next_cursor"] != cursor:
                    last_progress = time.monotonic()
                cursor = page["next_cursor"]
                if page["complete"] or page["state"] == "canceled":
                    return page["state"]
                if not warned and time.monotonic() - last_progress > STALL_NOTICE_S:
                    warned = True
                    tqdm.write(f"densecap submit: no result for {STALL_NOTICE_S:.0f} s; the job is still queued on "
                               "the server (is `python -m worker.job_worker` running?). Waiting; Ctrl-C and "
                               "the same command later resumes.", file=sys.stderr)
                if time.monotonic() - last_status > 2.0:
                    last_status = time.monotonic()
                    status = self.client.status(job_id)
                    eta = status.get("eta_s")
                    bar.set_postfix_str(f"server {status['rate']:.2f} img/s" + (f", ETA {eta:.0f}s" if eta else ""))
                if not page["results"]:
                    time.sleep(POLL_S)

    def finish(self, job_id: str, images: list[LocalImage]) -> int:
        records = self.out.load_records()
        job_file = self.out.load_job() or {}
        opt = dict(self.client.status(job_id).get("opt") or job_file.get("opt") or {})
        if opt:
            self.out.save_job({**job_file, "opt": opt})
        if self.out.image_size is None:
            self.out.image_size = image_size_of({"opt": opt})
        opt.update({"job_id": job_id, "server": self.client.server, "image_size": self.out.image_size,
                    "input_dir": str(self.root), "output_dir": str(self.out.path),
                    "box_frame": "boxes are [x, y, w, h], 0-indexed, in pixels of the img_name file beside "
                                 "results.json; original_size is [width, height] of the submitted image"})
        ok, errors = [], []
        for image in images:  # sorted by name
            record = records.get(image.name)
            if record is None or record.get("sha256") != image.sha256:
                errors.append({"img_name": image.name, "error": "no result was received for this file"})
                continue
            if record.get("error"):
                errors.append({"img_name": image.name, "error": record["error"]})
                continue
            ok.append(self.out.viewer_record(record, image.path))
        document = viewer_document(ok, opt)
        document["errors"] = errors
        self.out.write_json("results.json", document)
        print(f"densecap submit: {len(ok)} image(s) captioned, {len(errors)} error(s); wrote "
              f"{self.out.path / 'results.json'}; view with: densecap view {self.out.path}", file=sys.stderr)
        for err in errors[:20]:
            print(f"  {err['img_name']}: {err['error']}", file=sys.stderr)
        return 0


# --- folder and upload helpers ---------------------------------------------------------------------------


def image_size_of(status: dict[str, Any]) -> int:
    """The long side the viewer images get: the model's ``image_size`` from the job's ``opt``, else 720."""
    try:
        return int((status.get("opt") or {}).get("image_size") or DEFAULT_IMAGE_SIZE)
    except (TypeError, ValueError):
        return DEFAULT_IMAGE_SIZE


def scan_folder(root: Path, exclude: Path | None = None) -> list[LocalImage]:
    """Every regular file under ``root`` (recursively), sorted by name; dotfiles and dot-folders skipped.

    ``exclude`` (the output folder, if it lies inside ``root``) is skipped too, so re-runs do not caption
    their own outputs.
    """
    root = root.resolve()
    skip = exclude.resolve() if exclude is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != skip)
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = here / filename
            if not path.is_file():
                continue
            name = path.relative_to(root).as_posix()
            validate_item_name(name)
            found.append(LocalImage(name=name, path=path, size=path.stat().st_size))
    return sorted(found, key=lambda im: im.name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack_uploads(images: Iterable[LocalImage], chunk_size: int, max_request_bytes: int) -> list[list[LocalImage]]:
    """Group files into requests of at most ``chunk_size`` files and ``max_request_bytes`` bytes.

    The server makes one chunk (one RQ job, one batch on a worker) per request, so full requests keep the
    worker's batches full.
    """
    batches: list[list[LocalImage]] = []
    current: list[LocalImage] = []
    size = 0
    for image in images:
        cost = image.size + PART_OVERHEAD_BYTES + len(image.name)
        if current and (len(current) >= chunk_size or size + cost > max_request_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(image)
        size += cost
    if current:
        batches.append(current)
    return batches


# --- the output folder -----------------------------------------------------------------------------------


def resize_long_side(image, size: int):
    """Bilinear resize so the long side is ``size`` (small images are enlarged too, as the original saved
    them and as ``densecap caption`` does): the frame results.json's boxes are written in."""
    from PIL import Image
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image if new == image.size else image.resize(new, Image.BILINEAR)



def save_whole(image, target: Path) -> None:
    """Save through a temporary file and a rename: a kill mid-write never leaves half an image under the name
    (which a re-run would then keep, since it only writes missing viewer images)."""
    tmp = target.with_name(f".{target.stem}.partial{target.suffix}")  # keeps the suffix: Pillow picks the format
    image.save(tmp, quality=90) if target.suffix.lower() in (".jpg", ".jpeg") else image.save(tmp)
    os.replace(tmp, target)


class OutputFolder:
    """OUT: ``job.json`` (which job), ``results.jsonl`` (every result as it came), ``results.json`` (the
    viewer's file), the resized images under their names and ``drawn/`` (with ``--draw``)."""

    def __init__(self, path: Path, *, image_size: int | None = None, draw: bool = False, num_to_draw: int = 10):
        self.path = path
        self.image_size = image_size  # None until the job's opt says it
        self.draw = draw
        self.num_to_draw = num_to_draw
        self._tail_checked = False

    def load_job(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / "job.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def save_job(self, job: dict[str, Any]) -> None:
        self.write_json("job.json", job)

    def load_records(self) -> dict[str, dict[str, Any]]:
        """``results.jsonl`` as name -> record (the last line of a name wins; a torn last line is ignored)."""
        records: dict[str, dict[str, Any]] = {}
        try:
            with open(self.path / "results.jsonl", encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        records[record["name"]] = record
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue
        except FileNotFoundError:
            pass
        return records

    def append_record(self, record: dict[str, Any]) -> None:
        if not self._tail_checked:
            self._tail_checked = True
            self._drop_torn_tail(self.path / "results.jsonl")
        with open(self.path / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")

    @staticmethod
    def _drop_torn_tail(path: Path) -> None:
        """A run killed while appending may have left half a line at the end: cut it off, or the next record
        would be glued to it and both lost (readers skip lines that do not parse)."""
        try:
            with open(path, "rb+") as f:
                end = pos = f.seek(0, os.SEEK_END)
                cut = 0
                while pos > 0:
                    step = min(65536, pos)
                    f.seek(pos - step)
                    newline = f.read(step).rfind(b"\n")
                    if newline >= 0:
                        cut = pos - step + newline + 1
                        break
                    pos -= step
                if cut < end:
                    f.truncate(cut)
        except FileNotFoundError:
            pass

    def write_json(self, name: str, document: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(document, indent=1))
        os.replace(tmp, self.path / name)  # readers (the viewer) never see half a file

    def viewer_name(self, name: str) -> str:
        return name if Path(name).suffix.lower() in VIEWER_EXTENSIONS else name + ".jpg"

    def _inside(self, *parts: str) -> Path:
        """A path under OUT for an item name (names are checked again: they came over the network)."""
        validate_item_name(parts[-1])
        target = self.path.joinpath(*parts)
        if not target.resolve().is_relative_to(self.path.resolve()):
            raise BadItem(f"item name {parts[-1]!r} leads outside {self.path}")
        return target

    def write_images(self, record: dict[str, Any], source: Path) -> None:
        """The resized image for the viewer (and the drawn one); skipped for errors. Runs in a thread."""
        if record.get("error"):
            return
        try:
            from densecap_core.imageio import decode_image
            size = self.image_size or DEFAULT_IMAGE_SIZE
            image = resize_long_side(decode_image(source, max_pixels=0, draft_long_side=size), size)
            scale = image.width / record["width"]
            name = self.viewer_name(record["name"])
            target = self._inside(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            save_whole(image, target)
            if self.draw:
                self._draw(image, record, scale, self._inside("drawn", name))
        except Exception as exc:  # a viewer image is a convenience: report, never stop the run
            print(f"densecap submit: could not write the viewer image for {record['name']}: {exc}", file=sys.stderr)

    def _saved_size(self, width: int, height: int) -> tuple[int, int]:
        scale = (self.image_size or DEFAULT_IMAGE_SIZE) / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def _draw(self, image, record: dict[str, Any], scale: float, target: Path) -> None:
        try:
            from densecap_core.render import draw_regions
        except ImportError:
            return
        result = ImageResult.from_dict(record)
        regions = [type(r)(box=tuple(v * scale for v in r.box), caption=r.caption, score=r.score)
                   for r in result.regions]
        target.parent.mkdir(parents=True, exist_ok=True)
        drawn = draw_regions(image, regions, num_to_draw=self.num_to_draw)
        save_whole(drawn, target)

    def viewer_record(self, record: dict[str, Any], source: Path) -> dict[str, Any]:
        """The results.json entry, boxes scaled to the saved viewer image (written now if it is missing)."""
        name = self.viewer_name(record["name"])
        if not self._inside(name).is_file():
            self.write_images(record, source)
        result = ImageResult.from_dict(record)
        saved_width, _ = self._saved_size(result.width, result.height)
        entry = result.to_viewer_record(img_name=name, scale=saved_width / result.width)
        entry["original_size"] = [result.width, result.height]
        return entry
