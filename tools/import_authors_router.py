"""Import a Med-MoE authors' released router (`phi_router.pth`, `stablelm_router.pth`: keys
fc1.weight [E, hidden], fc1.bias [E]) into a router file. The authors never recorded which
modality each row is; give the order (index = expert) with --modalities.

    python tools/import_authors_router.py --pth phi_router.pth \\
        --modalities MRI,CT,pathology,X-Ray --flavor phi2 --out phi_router.safetensors
"""

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pth", required=True)
    p.add_argument("--modalities", required=True, help="comma-separated, index = expert")
    p.add_argument("--out", required=True)
    from medmoe_mcore.config.flavors import LANGUAGE_FLAVORS

    p.add_argument("--flavor", choices=sorted(LANGUAGE_FLAVORS),
                   help="check the hidden size against this flavor")
    args = p.parse_args(argv)

    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.config.flavors import language_flavor
    from medmoe_mcore.router import file as router_file

    try:
        router = router_file.from_authors_pth(args.pth, args.modalities.split(","))
        if args.flavor:
            router_file.check(router, args.pth, language_flavor(args.flavor).hidden_size)
        router_file.save(router, args.out)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {router.num_experts} experts x hidden {router.hidden_size}, "
          f"modalities {router.modalities}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
