"""Prints docs/tpu.md's table from the JSON reports in this folder (run_all.sh writes them).

  python benchmarks/tpu_preflight/table.py
"""
import json
import pathlib

HERE = pathlib.Path(__file__).parent
GIB = 1024 ** 3


def size(n: float) -> str:
  return f'{n / GIB:.2f} GiB' if n >= GIB / 10 else f'{n / 2**20:.1f} MiB'


def main():
  print('| config | slice | batch: global (per chip) | dtype | peak memory per chip (of HBM) '
        '| FLOPs per chip per step | FLOP-bound step (images/s) | collectives per step '
        '| compile |')
  print('|---|---|---|---|---|---|---|---|---|')
  reports = [json.loads(path.read_text()) for path in HERE.glob('*.json')]
  for r in sorted(reports, key=lambda r: (r['config'], r['chips'], r['global_batch'])):
    coll = ', '.join(f'{k} x{c["count"]} ({size(c["bytes"])})'
                     for k, c in sorted(r['collectives'].items()))
    m = r['memory']
    print(f'| `{r["config"]}` | {r["topology"]}: {r["chips"]} chips, {r["hosts"]} hosts '
          f'| {r["global_batch"]} ({r["per_chip_batch"]}) | {r["dtype"]} '
          f'| {size(m["peak_bytes"])} ({size(r["hbm_bytes"])}), temporaries '
          f'{size(m["temp_bytes"])}{"" if r["fits"] else ", DOES NOT FIT"} '
          f'| {r["flops_per_chip"] / 1e9:.1f} GFLOP '
          f'| {r["flop_bound_step_s"] * 1e3:.3g} ms ({r["flop_bound_images_per_s"]:,.0f}) '
          f'| {coll} | {r["compile_s"]:.0f} s |')


if __name__ == '__main__':
  main()
