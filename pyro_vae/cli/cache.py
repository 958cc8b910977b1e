"""``pyro-vae cache list|clear``: the run cache of ``fit(config, cache=True)`` (``$PYRO_VAE_CACHE``)."""

from __future__ import annotations

from ..infer.cache import CACHE_ENV, cache_root, clear, entries


def add_parser(sub) -> None:
    """The ``pyro-vae cache`` subcommand (``sub``: the CLI's subparsers)."""

    p = sub.add_parser(
        "cache",
        help="list or clear the run cache (trained runs and results kept by fit(cache=True))",
        description=f"The run cache: runs trained by fit(config, cache=True), compare_guides(..., cache=True) and the "
        f"notebooks, and results they computed. Folder: ${CACHE_ENV}, default ~/.cache/pyro-vae/runs.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="one line per entry: key, guide, epochs, final val ELBO, size, date, status, other settings")
    c = actions.add_parser("clear", help="delete entries (all of them unless KEYs are given)")
    c.add_argument("keys", nargs="*", metavar="KEY", help="keys, or their first characters, as cache list shows them")
    p.set_defaults(func=_cache_cli)


def _cache_cli(args) -> int:
    if args.action == "list":
        print(format_entries(entries()))
        return 0
    removed = clear(args.keys)
    print(f"removed {len(removed)} cache entr{'y' if len(removed) == 1 else 'ies'} from {cache_root()}")
    return 0


def format_entries(rows) -> str:
    """The table of ``pyro-vae cache list``."""
    folder = cache_root()
    if not rows:
        return f"the run cache is empty ({folder})"
    lines = [f"{'key':<12}  {'what':<16}  {'epochs':>6}  {'val ELBO':>9}  {'size':>9}  {'date':<16}  {'status':<7}  settings"]
    for r in rows:
        epochs = "" if r["epochs"] is None else str(r["epochs"])
        val = "" if r["val_elbo"] is None else f"{r['val_elbo']:.2f}"
        lines.append(f"{r['key'][:12]:<12}  {r['what'][:16]:<16}  {epochs:>6}  {val:>9}  {_size(r['bytes']):>9}  "
                     f"{r['date']:<16}  {r['status']:<7}  {r['settings']}".rstrip())
    total = sum(r["bytes"] for r in rows)
    lines.append(f"{len(rows)} entries, {_size(total)} in {folder} (pyro-vae cache clear [KEY ...] deletes them)")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
