"""`python -m kernels`: which backend can run which op on this machine, and why not."""
from kernels import OPS, available


def main():
    table = available()
    width = max(len(op) for op in OPS)
    for backend, ops in table.items():
        print(f"[{backend}]")
        for op in OPS:
            ok, reason = ops[op]
            print(f"  {op:<{width}}  {'yes' if ok else 'no: ' + reason}")


if __name__ == "__main__":
    main()
