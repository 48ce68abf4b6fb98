"""One line per defense_report.json: device, method, layer, the defense's seconds, CA/ASR/TA before -> after."""
import json
import sys

for path in sys.argv[1:]:
    report = json.load(open(path))
    defense, before, after = report["defense"], report["before"], report["after"]
    print(f"  {report['environment'].get('device')} {defense['method']} layer={defense['layer']} "
          f"defense {defense['seconds']:.2f}s CA {before['clean_acc']:.4f}->{after['clean_acc']:.4f} "
          f"ASR {before['asr']:.4f}->{after['asr']:.4f} (floor {after['asr_floor']:.4f}) "
          f"TA {before['target_acc']:.4f}->{after['target_acc']:.4f} repaired={defense['repaired']}"
          + (f" estimation: target {defense['estimation'].get('target_class')} "
             f"found={defense['estimation'].get('backdoor_found')} in {defense['estimation'].get('seconds', 0):.1f}s"
             if "estimation" in defense else ""))
