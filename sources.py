"""Data-set adapters: the hub sets and the local file formats, each read into the sample dicts data.py
describes (easy-VQA, which needs more, has its own file: easyvqa.py).

    local files        caption_folder, llava_json, text_files, preference_jsonl; local_source picks one
    Hugging Face hub   coco_captions, flickr30k, llava_instruct, the_cauldron, cosmopedia_text, rlaif_v

Local sources return lists. Hub sources return a `Stream`, which reads the dataset from the hub as
it is iterated (`datasets` streaming mode, nothing downloaded up front) and starts again from the
beginning each time. Every malformed file or row is one `DataError` line naming the file and line.
"""

import itertools
import json
import os
import re

CAPTION_PROMPT = "Describe the image."  # the user's request in a captioning chat (the caption replies)
IMAGE_MARKER = "<image>"  # where LLaVA-format text puts an image
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A data file or hub row that cannot be read; the message is one line naming the file and line."""


# ---------------------------------------------------------------------------
# Chats: user turns and image parts, which data.py's samples use too; LLaVA's "<image>" markers
# ---------------------------------------------------------------------------


def user_turn(text: str, n_images: int = 1) -> dict:
    """A user message: `n_images` image parts, then the text."""
    return {"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]}


def chat_sample(images: list, question: str, answer: str) -> dict:
    """The sample for one question about the images and its answer."""
    return {"messages": [user_turn(question, len(images)), {"role": "assistant", "content": answer}],
            "images": list(images)}


def count_image_parts(messages: list[dict]) -> int:
    """How many {"type": "image"} parts the messages hold."""
    return sum(1 for message in messages if isinstance(message.get("content"), list)
               for part in message["content"] if part.get("type") == "image")


def split_image_markers(text: str) -> list[dict]:
    """Text with LLaVA's "<image>" markers as content parts: each marker an image part, the text
    between them text parts (stripped of the newlines that set the marker apart; empty ones dropped).

        "<image>\\nWhat is this?" -> [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    """
    parts = []
    for i, piece in enumerate(text.split(IMAGE_MARKER)):
        if i > 0:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def llava_messages(turns, n_images: int, where: str) -> list[dict]:
    """LLaVA conversations ([{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]) as chat
    messages. A turn with "<image>" markers gets a content list; without, its text stays a string.
    Data that has images but no marker at all gets them in front of the first user turn, as LLaVA
    does; any other mismatch of markers and images is an error naming `where`."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: each turn needs a string 'value', got {turn!r:.80}")
        role = LLAVA_ROLES.get(turn.get("from"))
        if role is None:
            raise DataError(f"{where}: unknown speaker {turn.get('from')!r}; expected one of {sorted(LLAVA_ROLES)}")
        value = turn["value"]
        content = split_image_markers(value) if IMAGE_MARKER in value else value
        messages.append({"role": role, "content": content})
    markers = count_image_parts(messages)
    if markers == 0 and n_images > 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: {n_images} image(s) but no user turn to put them in")
        images = [{"type": "image"} for _ in range(n_images)]
        first_user["content"] = images + split_image_markers(first_user["content"])
    elif markers != n_images:
        raise DataError(f"{where}: {markers} {IMAGE_MARKER} marker(s) in the conversation but {n_images} image(s)")
    return messages


# ---------------------------------------------------------------------------
# Local files: caption folders, LLaVA JSON, text files, preference JSONL
# ---------------------------------------------------------------------------


def _read_jsonl(path: str):
    """(line number, object) for each non-blank line of a JSONL file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
                yield number, obj
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None


def _field(obj: dict, key: str, where: str) -> str:
    """obj[key], a string; otherwise a DataError naming `where`."""
    value = obj.get(key)
    if not isinstance(value, str):
        found = "missing" if key not in obj else f"a {type(value).__name__}, not a string"
        raise DataError(f"{where}: field {key!r} is {found}")
    return value


def _image_files(obj: dict, folder: str, where: str) -> list[str]:
    """The image paths a record names ("image": file, or "images": [files]), each checked to exist."""
    names = obj.get("images", obj.get("image"))
    if names is None:
        return []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{where}: 'image' must be a file name (or 'images' a list of them), got {names!r:.80}")
    paths = [os.path.join(folder, name) for name in names]
    root = os.path.realpath(folder)
    for name, path in zip(names, paths):
        if os.path.commonpath([root, os.path.realpath(path)]) != root:  # "../../etc/passwd", "/etc/hostname"
            raise DataError(f"{where}: image {name!r} lies outside {folder}; "
                            "a data file names images inside its folder")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: image {name!r} not found in {folder}")
    return paths


def caption_folder(folder: str, jsonl: str = "captions.jsonl", limit: int | None = None,
                   prompt: str = CAPTION_PROMPT) -> list[dict]:
    """A folder of images and a JSONL file of {"image": file name in the folder, "caption": text}
    lines; a line's "caption" may also be a list, one sample per caption."""
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    path = os.path.join(folder, jsonl)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; a caption folder needs {jsonl}, "
                                'with {"image": ..., "caption": ...} lines')
    samples = []
    for number, obj in _read_jsonl(path):
        where = f"{path}:{number}"
        images = _image_files(obj, folder, where)
        if len(images) != 1:
            raise DataError(f"{where}: needs one 'image'")
        captions = obj.get("caption")
        captions = [captions] if isinstance(captions, str) else captions
        if not captions or not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{where}: 'caption' must be a string or a list of strings")
        samples += [chat_sample(images, prompt, caption) for caption in captions]
        if limit is not None and len(samples) >= limit:
            break
    return samples[:limit]


def llava_json(path: str, image_folder: str | None = None, limit: int | None = None) -> list[dict]:
    """LLaVA-Instruct data: a JSON list (or JSONL) of {"image": file, "conversations": [{"from": "human",
    "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}. Each "<image>" marker
    becomes an image part where it stands; entries without "image" are text-only chats. Images are
    looked up in `image_folder` (default: the JSON file's folder)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    folder = os.path.dirname(path) if image_folder is None else os.path.expanduser(image_folder)
    if path.endswith(".jsonl"):
        entries = ((f"{path}:{number}", obj) for number, obj in _read_jsonl(path))
    else:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of LLaVA entries, got {type(data).__name__}")
        entries = ((f"{path}: entry {i}", obj) for i, obj in enumerate(data))
    samples = []
    for where, entry in entries:
        if limit is not None and len(samples) >= limit:
            break
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        images = _image_files(entry, folder, where)
        samples.append({"messages": llava_messages(entry.get("conversations"), len(images), where), "images": images})
    return samples


def text_files(paths, limit: int | None = None) -> list[dict]:
    """Plain text files (a path or a list of them), one document per paragraph: text between blank lines."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    samples = []
    for path in paths:
        path = os.path.expanduser(os.fspath(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
        samples += [{"text": p.strip()} for p in re.split(r"\n[ \t\r\f\v]*\n", text) if p.strip()]
    return samples[:limit]


def preference_jsonl(path: str, image_folder: str | None = None, limit: int | None = None) -> list[dict]:
    """Preference pairs, one JSONL line each: {"image": file (optional), "prompt": text, "chosen": text,
    "rejected": text}. The prompt may place the image with an "<image>" marker; without one the image
    comes first. Images are looked up in `image_folder` (default: the file's folder)."""
    path = os.path.expanduser(path)
    folder = os.path.dirname(path) if image_folder is None else os.path.expanduser(image_folder)
    samples = []
    for number, obj in _read_jsonl(path):
        if limit is not None and len(samples) >= limit:
            break
        where = f"{path}:{number}"
        prompt, chosen, rejected = (_field(obj, key, where) for key in ("prompt", "chosen", "rejected"))
        images = _image_files(obj, folder, where)
        messages = llava_messages([{"from": "human", "value": prompt}], len(images), where)
        samples.append({"prompt": messages, "images": images, "chosen": chosen, "rejected": rejected})
    return samples


# ---------------------------------------------------------------------------
# The Hugging Face hub, streamed with the `datasets` library
# ---------------------------------------------------------------------------

COCO_CAPTIONS_REPO = "jxie/coco_captions"  # COCO 2014, Karpathy splits train/validation/test, one row per caption
FLICKR30K_REPO = "umaru97/flickr30k_train_val_test"  # Flickr30k, Karpathy splits train/val/test, 5 captions a row
LLAVA_INSTRUCT_REPO = "HuggingFaceH4/llava-instruct-mix-vsft"  # LLaVA-Instruct mix as chats with images, train/test
THE_CAULDRON_REPO = "HuggingFaceM4/the_cauldron"  # 50 subsets (vqav2, ai2d, chartqa, ...), train only
SMOLLM_CORPUS_REPO = "HuggingFaceTB/smollm-corpus"  # config "cosmopedia-v2": synthetic textbooks, train only
RLAIF_V_REPO = "HuggingFaceH4/rlaif-v_formatted"  # RLAIF-V preference pairs as chats, train/test


class Stream:
    """A sample source read as it is iterated; each `iter()` starts again from the beginning."""

    def __init__(self, make, description: str):
        self.make, self.description = make, description

    def __iter__(self):
        return iter(self.make())

    def __len__(self):
        raise TypeError(f"{self.description} is a stream from the hub and has no length: iterate it, "
                        "or hold a part in memory with list(source(..., limit=N))")

    def __repr__(self):
        return f"Stream({self.description})"


def _unreachable(e: Exception) -> bool:
    """Whether an exception means the hub could not be reached (offline, DNS, timeouts, HF_HUB_OFFLINE)."""
    names = {cls.__name__ for cls in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        word in name for name in names for word in ("Connect", "Timeout", "Offline", "LocalEntryNotFound"))


def hub_rows(repo: str, config: str | None = None, split: str = "train", limit: int | None = None):
    """The rows of a hub dataset, streamed (`datasets.load_dataset(..., streaming=True)`), at most `limit`."""
    what = f"{repo}" + (f" ({config})" if config else "") + f", split {split!r}"
    try:
        import datasets
    except ImportError:
        raise ImportError(f"streaming {repo} from the Hugging Face hub needs the datasets library: "
                          "pip install datasets") from None
    rows, count = None, 0
    while limit is None or count < limit:
        try:
            if rows is None:
                args = (repo, config) if config else (repo,)
                rows = iter(datasets.load_dataset(*args, split=split, streaming=True))
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # everything the hub and `datasets` raise: turned into one sentence
            if _unreachable(e):
                raise ConnectionError(f"Cannot reach the Hugging Face hub to stream {what} ({type(e).__name__}); "
                                      "check the network (and HF_HUB_OFFLINE), or use an offline source "
                                      "such as easy-vqa-qa or a local folder.") from None
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"could not stream {what} from the Hugging Face hub: "
                            f"{type(e).__name__}: {message}") from None
        yield row
        count += 1


def _part(part, where: str) -> dict:
    """A hub content part ({"type", "text", "index", ...}, unused keys None) as ours."""
    if not isinstance(part, dict) or part.get("type") not in ("image", "text"):
        raise DataError(f"{where}: content parts must be {{'type': 'image' | 'text', ...}}, got {part!r:.80}")
    if part["type"] == "image":
        return {"type": "image"}
    return {"type": "text", "text": (part.get("text") or "").strip()}


def hub_messages(messages, where: str) -> list[dict]:
    """Hub-style chat messages (content a string or a list of parts) as ours: image parts bare, text
    parts stripped (some sets pad them with newlines), a content of text parts only as one string."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: messages must be a list, got {type(messages).__name__}")
    out = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise DataError(f"{where}: each message needs a role and a content, got {message!r:.80}")
        content = message.get("content")
        if isinstance(content, list):
            parts = [p for p in (_part(p, where) for p in content) if p["type"] == "image" or p["text"]]
            if not any(p["type"] == "image" for p in parts):
                content = "\n".join(p["text"] for p in parts)
            else:
                content = parts
        elif not isinstance(content, str):
            raise DataError(f"{where}: message content must be a string or a list of parts")
        out.append({"role": message["role"], "content": content})
    return out


def _images(value) -> list:
    """A hub row's images: one image, a list of them, or None."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _chat_row(row: dict, where: str) -> dict:
    """A hub chat row, HF style ("messages" + "images") or LLaVA style ("conversations" + "image")."""
    images = _images(row.get("images", row.get("image")))
    if "conversations" in row:
        return {"messages": llava_messages(row["conversations"], len(images), where), "images": images}
    messages = hub_messages(row.get("messages"), where)
    if count_image_parts(messages) != len(images):
        raise DataError(f"{where}: {count_image_parts(messages)} image part(s) but {len(images)} image(s)")
    return {"messages": messages, "images": images}


def _captions(value, where: str) -> list[str]:
    captions = [value] if isinstance(value, str) else value
    if not captions or not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DataError(f"{where}: caption must be a string or a list of strings, got {value!r:.80}")
    return captions


def coco_captions(split: str = "train", limit: int | None = None, prompt: str = CAPTION_PROMPT) -> Stream:
    """COCO captions (jxie/coco_captions: splits train/validation/test, one row per caption, so each
    image comes five times in a row): captioning chats."""
    def samples():
        for i, row in enumerate(hub_rows(COCO_CAPTIONS_REPO, None, split, limit)):
            where = f"{COCO_CAPTIONS_REPO} {split} row {i}"
            for caption in _captions(row.get("caption"), where):
                yield chat_sample([row["image"]], prompt, caption)
    return Stream(lambda: itertools.islice(samples(), limit), f"coco_captions {split}")


FLICKR30K_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def flickr30k(split: str = "train", limit: int | None = None, prompt: str = CAPTION_PROMPT,
              repo: str = FLICKR30K_REPO) -> Stream:
    """Flickr30k captions (Karpathy splits: train 29,000 images, val 1,014, test 1,000; five captions
    each): one captioning chat per caption."""
    hub_split = FLICKR30K_SPLITS.get(split, split) if repo == FLICKR30K_REPO else split

    def samples():
        for i, row in enumerate(hub_rows(repo, None, hub_split)):
            captions = row.get("caption", row.get("captions"))
            for caption in _captions(captions, f"{repo} {hub_split} row {i}"):
                yield chat_sample([row["image"]], prompt, caption)
    return Stream(lambda: itertools.islice(samples(), limit), f"flickr30k {split}")


def llava_instruct(split: str = "train", limit: int | None = None, repo: str = LLAVA_INSTRUCT_REPO) -> Stream:
    """LLaVA-Instruct conversations with their images (by default HuggingFaceH4/llava-instruct-mix-vsft,
    HF-style "messages" + "images"; a repo in LLaVA's own "conversations" + "image" layout works too)."""
    def samples():
        for i, row in enumerate(hub_rows(repo, None, split, limit)):
            yield _chat_row(row, f"{repo} {split} row {i}")
    return Stream(samples, f"llava_instruct {split}")


def the_cauldron(subset: str, split: str = "train", limit: int | None = None) -> Stream:
    """One subset of HuggingFaceM4/the_cauldron (e.g. "vqav2", "ai2d", "chartqa"): rows of images and
    texts [{"user", "assistant"}, ...], as chats with all the images in front of the first question."""
    def samples():
        for i, row in enumerate(hub_rows(THE_CAULDRON_REPO, subset, split, limit)):
            where = f"{THE_CAULDRON_REPO} ({subset}) {split} row {i}"
            images, texts = _images(row.get("images")), row.get("texts")
            if not isinstance(texts, list) or not texts:
                raise DataError(f"{where}: 'texts' must be a non-empty list of {{user, assistant}} turns")
            messages = []
            for turn in texts:
                if not isinstance(turn, dict):
                    raise DataError(f"{where}: each of 'texts' must be {{user, assistant}}, got {turn!r:.80}")
                user, assistant = _field(turn, "user", where), _field(turn, "assistant", where)
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            if images:
                messages[0] = user_turn(messages[0]["content"], len(images))
            yield {"messages": messages, "images": images}
    return Stream(samples, f"the_cauldron {subset} {split}")


def cosmopedia_text(split: str = "train", limit: int | None = None) -> Stream:
    """Cosmopedia v2 (HuggingFaceTB/smollm-corpus, config "cosmopedia-v2"): synthetic textbooks and
    stories, plain text for language-model pretraining."""
    def samples():
        for i, row in enumerate(hub_rows(SMOLLM_CORPUS_REPO, "cosmopedia-v2", split, limit)):
            yield {"text": _field(row, "text", f"{SMOLLM_CORPUS_REPO} (cosmopedia-v2) {split} row {i}")}
    return Stream(samples, f"cosmopedia_text {split}")


def _reply_text(value, where: str) -> str:
    """A preference side: a string, or chat messages whose assistant turn holds the reply."""
    if isinstance(value, str):
        return value
    messages = hub_messages(value, where)
    replies = [m["content"] for m in messages if m["role"] == "assistant" and isinstance(m["content"], str)]
    if not replies:
        raise DataError(f"{where}: chosen/rejected must be a string or messages with an assistant reply")
    return "\n".join(replies)


def rlaif_v(split: str = "train", limit: int | None = None) -> Stream:
    """RLAIF-V preference pairs (HuggingFaceH4/rlaif-v_formatted, train 78,975 / test 4,157): "images",
    a "prompt" chat with an image part, and "chosen"/"rejected" assistant turns."""
    def samples():
        for i, row in enumerate(hub_rows(RLAIF_V_REPO, None, split, limit)):
            where = f"{RLAIF_V_REPO} {split} row {i}"
            images = _images(row.get("images", row.get("image")))
            prompt = row.get("prompt", row.get("question"))
            prompt = [user_turn(prompt, len(images))] if isinstance(prompt, str) else hub_messages(prompt, where)
            if count_image_parts(prompt) != len(images):
                raise DataError(f"{where}: {count_image_parts(prompt)} image part(s) but {len(images)} image(s)")
            yield {"prompt": prompt, "images": images, "chosen": _reply_text(row.get("chosen"), where),
                   "rejected": _reply_text(row.get("rejected"), where)}
    return Stream(samples, f"rlaif_v {split}")


# ---------------------------------------------------------------------------
# A local path: which of the formats above it holds
# ---------------------------------------------------------------------------


def local_source(path: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """The samples of an existing local file or folder, by what it holds:

        a folder with captions.jsonl (or SPLIT/captions.jsonl)   caption_folder
        a folder of .txt files, or a .txt file                     text_files
        a .json file                                               llava_json (images beside it)
        a .jsonl file: by its first line's keys                    preference_jsonl ("chosen"),
                                                                   llava_json ("conversations"),
                                                                   caption_folder ("caption")
    """
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, split)):
            if os.path.isfile(os.path.join(folder, "captions.jsonl")):
                return caption_folder(folder, limit=limit)
        texts = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt"))
        if texts:
            return text_files(texts, limit=limit)
        raise DataError(f"{path}: a data folder needs captions.jsonl (or {split}/captions.jsonl) or .txt files")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.endswith(".txt"):
        return text_files([path], limit=limit)
    if path.endswith(".json"):
        return llava_json(path, limit=limit)
    if path.endswith(".jsonl"):
        keys = next((set(obj) for _, obj in _read_jsonl(path)), set())
        if "chosen" in keys:
            return preference_jsonl(path, limit=limit)
        if "conversations" in keys:
            return llava_json(path, limit=limit)
        if "caption" in keys:
            return caption_folder(os.path.dirname(path) or ".", jsonl=os.path.basename(path), limit=limit)
        raise DataError(f"{path}: cannot tell what the lines hold (keys {sorted(keys)}); expected "
                        "chosen/rejected, conversations, or image/caption")
    raise DataError(f"{path}: unknown data file type; expected .json, .jsonl, .txt or a folder")
