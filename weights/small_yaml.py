"""original_config=: the LDM / SGM yaml of a single file, read with pyyaml when installed or with a small
reader of the subset those files use (no dependency of minidiff)."""
import re

from ..errors import FileFormatError


def read_yaml(path):
    """The LDM / SGM yaml (v1-inference.yaml, sd_xl_base.yaml, ...). pyyaml when installed (it is no dependency of
    minidiff); else a small reader of the subset those files use: nested mappings, `- ` lists of scalars or of
    mappings, inline [lists], scalars and comments. It refuses anything else, naming the line."""
    if isinstance(path, dict):
        return path
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        import yaml
    except ImportError:
        return parse_small_yaml(text, path)
    return yaml.safe_load(text)


def parse_small_yaml(text, where="yaml"):
    lines = []  # (line number, indent, content) without blanks and comments
    for lineno, raw in enumerate(text.splitlines(), 1):
        content = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if content.strip():
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise FileFormatError(f"{where}:{lineno}: a tab in the indentation (pip install pyyaml to read any yaml)")
            lines.append([lineno, len(content) - len(content.lstrip()), content.strip()])

    def block(i, indent):
        """The mapping or list whose lines start at lines[i] with `indent`; returns (value, next i)."""
        if lines[i][2].startswith("- ") or lines[i][2] == "-":
            items = []
            while i < len(lines) and lines[i][1] == indent and lines[i][2].startswith("-"):
                lineno, _, content = lines[i]
                rest = content[1:].strip()
                if re.match(r"[\w.\-]+\s*:(\s|$)", rest):  # "- key: value": a mapping, its keys two columns in
                    lines[i] = [lineno, indent + 2, rest]
                    value, i = block(i, indent + 2)
                else:
                    value, i = _yaml_scalar(rest, where, lineno), i + 1
                items.append(value)
            return items, i
        mapping = {}
        while i < len(lines) and lines[i][1] == indent:
            lineno, _, content = lines[i]
            m = re.match(r"([\w.\-/]+)\s*:(?:\s+(.*))?$", content)
            if not m:
                raise FileFormatError(f"{where}:{lineno}: {content!r} is beyond minidiff's small yaml reader "
                                 "(pip install pyyaml to read any yaml)")
            key, value = m.group(1), (m.group(2) or "").strip()
            i += 1
            if value:
                mapping[key] = _yaml_scalar(value, where, lineno)
            elif i < len(lines) and (lines[i][1] > indent or (lines[i][1] == indent and lines[i][2].startswith("-"))):
                mapping[key], i = block(i, lines[i][1])
            else:
                mapping[key] = None
        if i < len(lines) and lines[i][1] > indent:
            raise FileFormatError(f"{where}:{lines[i][0]}: unexpected indentation (pip install pyyaml to read any yaml)")
        return mapping, i

    if not lines:
        return {}
    value, i = block(0, lines[0][1])
    if i < len(lines):
        raise FileFormatError(f"{where}:{lines[i][0]}: unexpected indentation (pip install pyyaml to read any yaml)")
    return value


def _yaml_scalar(v, where, lineno):
    if v.startswith("[") and v.endswith("]"):
        return [_yaml_scalar(x.strip(), where, lineno) for x in v[1:-1].split(",") if x.strip()]
    if v.startswith(("{", "|", ">", "&", "*", "!", "[")):
        raise FileFormatError(f"{where}:{lineno}: {v!r} is beyond minidiff's small yaml reader (pip install pyyaml)")
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v in ("null", "Null", "NULL", "~"):
        return None
    if re.fullmatch(r"[-+]?\d+", v):
        return int(v)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?", v):  # yaml 1.1 floats have a dot
        return float(v)
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    return v
