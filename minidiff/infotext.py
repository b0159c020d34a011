"""A1111's "infotext": the generation parameters written into a PNG's `parameters` text chunk.

    a castle on a hill, (sunset:1.2)
    Negative prompt: blurry
    Steps: 25, Sampler: Euler a, CFG scale: 7.0, Seed: 3, Size: 512x512, Model: ..., Prompt syntax: a1111

The prompt (one or more lines), then the negative prompt after `Negative prompt: ` (to the settings line),
then one line of `Key: value` settings separated by commas; a value with a comma is written in double quotes
(JSON string escapes). minidiff writes this form and reads it back, its own and A1111's.
"""
import json
import re

# one `Key: value` setting; a quoted value may hold commas
SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt:"


def format_infotext(prompt, negative, settings):
    """The text block for `prompt`, `negative` (None or "" for none) and {key: value} settings."""
    def value(v):
        v = str(v)
        return json.dumps(v, ensure_ascii=False) if any(c in v for c in ',:"\n') else v

    lines = [prompt]
    if negative:
        lines.append(f"{NEGATIVE} {negative}")
    lines.append(", ".join(f"{k}: {value(v)}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def parse_infotext(text):
    """(prompt, negative prompt, {key: value string}) of an infotext, as A1111 reads it."""
    lines = text.strip().split("\n")
    settings = {}
    last = lines[-1] if lines else ""
    if len(SETTING.findall(last)) >= 3:  # A1111's rule: a settings line has at least three settings
        lines = lines[:-1]
        for key, v in SETTING.findall(last):
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] == '"':
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    pass
            settings[key.strip()] = v
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), settings


def read_png_infotext(path):
    """The `parameters` text of a PNG minidiff or A1111 wrote (ComfyUI's workflow JSON is not an infotext)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            info = dict(getattr(image, "text", {}) or image.info)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it as an image ({e})") from e
    text = info.get("parameters")
    if not isinstance(text, str) or not text.strip():
        found = ", ".join(sorted(k for k in info if isinstance(info[k], str))) or "none"
        raise ValueError(f"{path} has no 'parameters' text (the generation parameters minidiff and A1111 write; "
                         f"its text chunks: {found})")
    return text
