"""The Q-Former against transformers' BLIP-2 (Blip2QFormerModel, the text model, ITC and ITM of
Blip2ForImageTextRetrieval), BERT and DistilBERT on tiny random checkpoints written to disk; its masks,
losses, sharded loading and checkpoint errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import CheckpointError
from configs import blip2_qformer_settings, build_config
from layouts import blip2_key_map
from qformer import QFormer, QFormerConfig, hard_negatives, itc_loss, similarity

transformers = pytest.importorskip("transformers")

N_QUERIES, VISION_DIM = 5, 24
TINY_QFORMER = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 48,
                "vocab_size": 99, "max_position_embeddings": 40}
TINY_VISION = {"hidden_size": VISION_DIM, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 16, "patch_size": 8}
TINY_OPT = {"model_type": "opt", "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 1, "ffn_dim": 32,
            "num_attention_heads": 2, "max_position_embeddings": 64, "word_embed_proj_dim": 16}


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def randomize(model, seed=0):
    """Random values everywhere: HF starts LayerNorms at 1/0 and the query tokens at 0, which would
    hide a swapped or dropped tensor."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() < 2 else p.normal_(0, 0.1)
    return model.eval()


def blip2_config(frequency=2, text=False):
    return transformers.Blip2Config(
        vision_config=TINY_VISION, text_config=TINY_OPT, num_query_tokens=N_QUERIES, image_text_hidden_size=8,
        qformer_config=dict(TINY_QFORMER, cross_attention_frequency=frequency, use_qformer_text_input=text))


def text_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padding at the end of two captions
    mask[2, 2:] = 0
    return ids, mask


def image_batch(n=3, seed=2):
    return torch.randn(n, 7, VISION_DIM, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frequency", [1, 2])
def test_query_parity_with_blip2_qformer(tmp_path, frequency):
    """Blip2ForConditionalGeneration's layout (as Salesforce/blip2-opt-2.7b): queries only."""
    hf = randomize(transformers.Blip2ForConditionalGeneration(blip2_config(frequency)))
    hf.save_pretrained(tmp_path)
    ours = QFormer.from_pretrained(str(tmp_path))
    cfg = ours.config
    assert (cfg.n_queries, cfg.dim, cfg.encoder_dim, cfg.cross_attention_frequency) == (N_QUERIES, 32, VISION_DIM, frequency)
    assert not cfg.text and cfg.proj_dim is None and not cfg.itm_head
    assert [layer.cross_attn is not None for layer in ours.layers] == [i % frequency == 0 for i in range(3)]
    image = image_batch()
    image_mask = torch.ones(3, 7, dtype=torch.long)
    image_mask[1, 5:] = 0  # fewer patches in one image
    with torch.no_grad():
        for mask in (None, image_mask):
            want = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=image,
                              encoder_attention_mask=mask).last_hidden_state
            got = ours(image, mask)
            assert got.shape == (3, N_QUERIES, 32)
            assert max_diff(want, got) <= 1e-4
    with pytest.raises(ValueError, match="no text side"):
        ours.encode_text(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("text", [False, True], ids=["queries-only", "text-input"])
def test_query_parity_with_standalone_blip2_qformer(tmp_path, text):
    """What Blip2QFormerModel.save_pretrained writes (model_type blip_2_qformer, names without `qformer.`,
    no query tokens: they are its input). Ours gets the same query embeddings as its query tokens."""
    config = transformers.Blip2QFormerConfig(**TINY_QFORMER, encoder_hidden_size=VISION_DIM,
                                             use_qformer_text_input=text)
    hf = randomize(transformers.Blip2QFormerModel(config))
    hf.save_pretrained(tmp_path)
    ours = QFormer.from_pretrained(str(tmp_path), n_queries=N_QUERIES)
    assert (ours.config.n_queries, ours.config.encoder_dim, ours.config.text) == (N_QUERIES, VISION_DIM, text)
    queries = torch.randn(1, N_QUERIES, 32, generator=torch.Generator().manual_seed(4))  # (1, Q, D)
    image = image_batch()  # (3, 7, 24)
    image_mask = torch.ones(3, 7, dtype=torch.long)
    image_mask[1, 5:] = 0
    with torch.no_grad():
        ours.query_tokens.copy_(queries)
        for mask in (None, image_mask):
            want = hf(query_embeds=queries.expand(3, -1, -1), encoder_hidden_states=image,
                      encoder_attention_mask=mask).last_hidden_state
            assert max_diff(want, ours(image, mask)) <= 1e-4


@pytest.fixture(scope="module", params=[1, 2], ids=["every-layer", "every-2nd"])
def retrieval(request, tmp_path_factory):
    """A Blip2ForImageTextRetrieval (text side, projections, ITM head) on disk, and ours from it."""
    folder = tmp_path_factory.mktemp(f"retrieval{request.param}")
    hf = randomize(transformers.Blip2ForImageTextRetrieval(blip2_config(request.param, text=True)))
    hf.save_pretrained(folder)
    return hf, QFormer.from_pretrained(str(folder)), folder


def test_text_parity_with_blip2_text_model(retrieval):
    _, ours, folder = retrieval
    assert ours.config.text and ours.config.proj_dim == 8 and ours.config.itm_head
    text_model = transformers.Blip2TextModelWithProjection.from_pretrained(folder).eval()
    ids, mask = text_batch()
    with torch.no_grad():
        want = text_model(input_ids=ids, attention_mask=mask)
        assert max_diff(want.last_hidden_state, ours.encode_text(ids, mask)) <= 1e-4
        assert max_diff(want.text_embeds[:, 0], ours.text_features(ids, mask)) <= 1e-4  # the [CLS] feature


def test_itc_and_itm_parity_with_blip2_retrieval(retrieval):
    hf, ours, _ = retrieval
    ids, mask = text_batch()
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image = hf.vision_model(pixel_values=pixels).last_hidden_state  # (3, 5, 24): the frozen tower's features
        want = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=image).last_hidden_state
        assert max_diff(want, ours(image)) <= 1e-4
        itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        sim = similarity(ours.image_features(image), ours.text_features(ids, mask))  # (images, texts)
        assert sim.shape == (3, 3) and max_diff(itc.logits_per_image, sim) <= 1e-4
        itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        assert max_diff(itm.logits_per_image, ours.itm_logits(image, ids, mask)) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Masks: the joint pass of ITM, the text alone
# ---------------------------------------------------------------------------------------------


def test_joint_masks(retrieval):
    _, ours, _ = retrieval
    ids, mask = text_batch()
    image = image_batch()
    with torch.no_grad():
        queries = ours(image)
        both = ours.encode_joint(image, ids, mask)
        assert max_diff(both[:, :N_QUERIES], queries) > 1e-3  # ITM: queries and text see each other
        padded = ids.clone()
        padded[1, 4:] = (padded[1, 4:] + 1) % 99  # other tokens under the padding change nothing
        assert max_diff(ours.encode_joint(image, padded, mask)[1, : N_QUERIES + 4], both[1, : N_QUERIES + 4]) <= 1e-5
    # a padding-only caption must not give NaN (its rows attend everywhere)
    assert torch.isfinite(ours.encode_joint(image[:1], ids[:1], torch.zeros(1, 6))).all()
    assert torch.isfinite(ours.encode_text(ids[:1], torch.zeros(1, 6))).all()


# ---------------------------------------------------------------------------------------------
# Loading: shards, BERT, DistilBERT, our own folders, bad checkpoints
# ---------------------------------------------------------------------------------------------


def test_blip2_opt_hub_config():
    """Salesforce/blip2-opt-2.7b's config.json leaves the Q-Former and vision sizes to the defaults;
    its Q-Former tensors are the query path only (no text embeddings, no text feed-forward, no heads)."""
    hub = {"architectures": ["Blip2ForConditionalGeneration"], "image_text_hidden_size": 256,
           "image_token_index": 50265, "model_type": "blip-2", "num_query_tokens": 32,
           "qformer_config": {"classifier_dropout": None, "model_type": "blip_2_qformer"},
           "text_config": {"model_type": "opt", "hidden_size": 2560},
           "vision_config": {"dropout": 0.0, "model_type": "blip_2_vision_model", "num_channels": 3}}
    names = set(blip2_key_map(QFormerConfig(text=False, proj_dim=None, itm_head=False)))
    assert "qformer.encoder.layer.10.crossattention.attention.query.weight" in names
    assert "qformer.encoder.layer.11.crossattention.attention.query.weight" not in names
    assert len(names) == 1 + 2 + 12 * 16 + 6 * 10  # query_tokens, layernorm, self-attn + query FFN, cross-attn
    cfg = build_config(QFormerConfig, blip2_qformer_settings(hub, names))
    assert cfg == QFormerConfig(dim=768, n_layers=12, n_heads=12, hidden_dim=3072, n_queries=32, encoder_dim=1408,
                                cross_attention_frequency=2, text=False, proj_dim=None, itm_head=False)


def write_sharded(state: dict, folder, groups: dict, config: dict):
    """A sharded checkpoint: one shard per group of tensor names (a prefix test each)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for i, (shard, test) in enumerate(groups.items()):
        part = {k: v.contiguous() for k, v in state.items() if test(k)}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    assert set(weight_map) == set(state)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_checkpoint_reads_only_qformer_shards(tmp_path):
    hf = randomize(transformers.Blip2ForConditionalGeneration(blip2_config(2)))
    hf.save_pretrained(tmp_path / "whole")
    state = load_file(tmp_path / "whole" / "model.safetensors")
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    layers = lambda lo, hi: lambda k: any(k.startswith(f"qformer.encoder.layer.{i}.") for i in range(lo, hi))
    write_sharded(state, tmp_path / "sharded", {
        "model-00001-of-00004.safetensors": lambda k: k.startswith("vision_model."),
        "model-00002-of-00004.safetensors": lambda k: k == "query_tokens" or k.startswith("qformer.layernorm") or layers(0, 2)(k),
        "model-00003-of-00004.safetensors": lambda k: layers(2, 3)(k) or k.startswith("language_projection."),
        "model-00004-of-00004.safetensors": lambda k: k.startswith("language_model."),
    }, config)
    for shard in ("model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors"):  # tower and LM
        (tmp_path / "sharded" / shard).write_bytes(b"not a safetensors file")  # opening it would fail
    ours = QFormer.from_pretrained(str(tmp_path / "sharded"))
    whole = QFormer.from_pretrained(str(tmp_path / "whole"))
    image = image_batch()
    with torch.no_grad():
        assert torch.equal(ours(image), whole(image))
    (tmp_path / "sharded" / "model-00003-of-00004.safetensors").write_bytes(b"truncated")  # one we need
    with pytest.raises(CheckpointError, match="model-00003-of-00004.safetensors: unreadable"):
        QFormer.from_pretrained(str(tmp_path / "sharded"))


def tiny_bert(tmp_path, kind):
    if kind == "bert":  # BertForPreTraining: the encoder under "bert.", the MLM/NSP heads under "cls."
        cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=40)
        hf = randomize(transformers.BertForPreTraining(cfg))
        hf.save_pretrained(tmp_path)
        return hf.bert
    cfg = transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                        max_position_embeddings=40)
    hf = randomize(transformers.DistilBertModel(cfg))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_from_bert(tmp_path, kind):
    bert = tiny_bert(tmp_path, kind)
    torch.manual_seed(5)
    ours = QFormer.from_bert(str(tmp_path), encoder_dim=VISION_DIM, n_queries=N_QUERIES, proj_dim=8)
    cfg = ours.config
    assert (cfg.dim, cfg.n_layers, cfg.n_queries, cfg.encoder_dim, cfg.text) == (32, 2, N_QUERIES, VISION_DIM, True)
    ids, mask = text_batch()
    with torch.no_grad():  # the text path is the BERT encoder, token-type embedding included
        assert max_diff(bert(input_ids=ids, attention_mask=mask).last_hidden_state, ours.encode_text(ids, mask)) <= 1e-4
    for layer in ours.layers:  # the query feed-forward starts as a copy of BERT's
        for a, b in zip(layer.query_ffn.parameters(), layer.text_ffn.parameters()):
            assert torch.equal(a, b)
    fresh = ours.layers[0].cross_attn  # fresh cross-attention, BERT's init
    assert fresh.k.weight.shape == (32, VISION_DIM) and 0.01 < fresh.k.weight.std().item() < 0.03
    assert torch.all(fresh.k.bias == 0) and torch.all(fresh.norm.weight == 1)
    assert 0.01 < ours.query_tokens.std().item() < 0.03 and math.isclose(ours.temperature().item(), 0.07, rel_tol=1e-6)
    assert ours(image_batch()).shape == (3, N_QUERIES, 32)
    assert ours.text_features(ids, mask).shape == (3, 8)


def test_from_bert_legacy_layernorm_names(tmp_path):
    """bert-base-uncased's own file names its LayerNorms gamma/beta (from the TF checkpoint)."""
    bert = tiny_bert(tmp_path / "new", "bert")
    state = load_file(tmp_path / "new" / "model.safetensors")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    save_file({k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}, tmp_path / "old" / "model.safetensors")
    ours = QFormer.from_bert(str(tmp_path / "old"), encoder_dim=VISION_DIM)
    ids, mask = text_batch()
    with torch.no_grad():
        assert max_diff(bert(input_ids=ids, attention_mask=mask).last_hidden_state, ours.encode_text(ids, mask)) <= 1e-4


def test_save_pretrained_round_trip(tmp_path, retrieval):
    _, ours, _ = retrieval
    with torch.no_grad():
        ours.temp.fill_(0.05)
    ours.save_pretrained(str(tmp_path / "ours"))
    back = QFormer.from_pretrained(str(tmp_path / "ours"))
    assert back.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
    with torch.no_grad():
        ours.temp.fill_(0.07)


def test_bad_checkpoints(tmp_path):
    hf = randomize(transformers.Blip2ForConditionalGeneration(blip2_config(2)))
    hf.save_pretrained(tmp_path / "good")
    state = load_file(tmp_path / "good" / "model.safetensors")
    config = (tmp_path / "good" / "config.json").read_text()

    def broken(name, change):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(config)
        s = dict(state)
        change(s)
        save_file(s, folder / "model.safetensors")
        return str(folder)

    def drop_and_add(s):
        del s["qformer.encoder.layer.2.crossattention.attention.key.weight"]
        s["qformer.encoder.layer.0.surprise.weight"] = torch.zeros(1)

    with pytest.raises(CheckpointError) as e:
        QFormer.from_pretrained(broken("keys", drop_and_add))
    assert "\n" not in str(e.value)
    assert ("missing keys ['qformer.encoder.layer.2.crossattention.attention.key.weight'], "
            "unexpected keys ['qformer.encoder.layer.0.surprise.weight']") in str(e.value)

    def wrong_shape(s):
        s["query_tokens"] = torch.zeros(1, N_QUERIES + 1, 32)

    with pytest.raises(CheckpointError, match=r"query_tokens: checkpoint shape \(1, 6, 32\), model expects \(1, 5, 32\)"):
        QFormer.from_pretrained(broken("shape", wrong_shape))
    (tmp_path / "keys" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="'llama' model"):
        QFormer.from_pretrained(str(tmp_path / "keys"))
    with pytest.raises(CheckpointError, match="from_bert loads bert and distilbert"):
        QFormer.from_bert(str(tmp_path / "good"))
    with pytest.raises(CheckpointError, match="no such folder"):
        QFormer.from_pretrained(str(tmp_path / "nowhere"))

    QFormer(QFormerConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=48, n_queries=N_QUERIES, encoder_dim=VISION_DIM,
                          vocab_size=99, max_positions=40)).save_pretrained(str(tmp_path / "ours"))
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    for change, message in [({"act": "swish"}, "config.json: act 'swish' is not supported"),
                            ({"n_queries": "5"}, 'config.json: n_queries must be int, not "5"'),
                            ({"queries": 5}, "config.json: unknown key 'queries'")]:
        (tmp_path / "ours" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message) as e:
            QFormer.from_pretrained(str(tmp_path / "ours"))
        assert "\n" not in str(e.value)

    tiny_bert(tmp_path / "bert", "bert")
    bert_state = load_file(tmp_path / "bert" / "model.safetensors")
    del bert_state["bert.encoder.layer.1.output.dense.bias"]
    save_file(bert_state, tmp_path / "bert" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder.layer.1.output.dense.bias'\], unexpected keys \[\]"):
        QFormer.from_bert(str(tmp_path / "bert"))


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def test_itc_loss_by_hand():
    image = torch.tensor([[[1.0, 0, 0], [0, 1, 0]],  # image 0: two queries
                          [[0, 0, 1.0], [0.6, 0.8, 0]],
                          [[0.6, 0, 0.8], [0, 0.8, 0.6]]])  # (B=3, Q=2, d=3), unit rows
    text = torch.tensor([[0.0, 1, 0], [0, 0, 1], [0.8, 0.6, 0]])  # (3, 3)
    temperature = 0.1
    sim = [[max(sum(a * b for a, b in zip(q, t)) for q in img) for t in text.tolist()] for img in image.tolist()]
    assert torch.allclose(similarity(image, text), torch.tensor(sim))

    def cross_entropy(rows, eps):  # by the formula: -(1-eps) log p_ii - eps/B sum_j log p_ij
        total = 0.0
        for i, row in enumerate(rows):
            logits = [s / temperature for s in row]
            log_z = math.log(sum(math.exp(v) for v in logits))
            log_p = [v - log_z for v in logits]
            total += -(1 - eps) * log_p[i] - eps / len(row) * sum(log_p)
        return total / len(rows)

    columns = [list(c) for c in zip(*sim)]
    for eps in (0.0, 0.1):
        want = (cross_entropy(sim, eps) + cross_entropy(columns, eps)) / 2
        assert math.isclose(itc_loss(image, text, temperature, label_smoothing=eps).item(), want, rel_tol=1e-5)


def test_learned_temperature_and_itm_loss(retrieval):
    _, ours, _ = retrieval
    ids, mask = text_batch()
    image = image_batch()
    ours.zero_grad()
    image_feats, text_feats = ours.image_features(image), ours.text_features(ids, mask)
    loss = itc_loss(image_feats, text_feats, ours.temperature())
    loss.backward()
    assert ours.temp.grad is not None and ours.temp.grad.abs().item() > 0
    assert ours.query_tokens.grad.abs().sum() > 0 and ours.word_embed.weight.grad.abs().sum() > 0
    with torch.no_grad():
        ours.temp.fill_(3.0)
    assert ours.temperature().item() == 0.5 and ours.temp.item() == 3.0  # read clamped, the parameter untouched
    with torch.no_grad():
        ours.temp.fill_(0.07)
    ours.zero_grad()
    loss = ours.itm_loss(image, ids, mask, similarity(image_feats, text_feats).detach(),
                         generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and ours.itm_head.weight.grad.abs().sum() > 0
    ours.zero_grad()


def test_hard_negatives():
    sim = torch.full((4, 4), -5.0)
    sim.fill_diagonal_(10.0)  # the positives are the most similar: must never be drawn
    sim[0, 2] = sim[3, 1] = 8.0  # image 0's hardest text is 2; text 1's hardest image is 3
    g = torch.Generator().manual_seed(0)
    draws = [hard_negatives(sim, generator=g) for _ in range(50)]
    for neg_text, neg_image in draws:
        assert all(neg_text != torch.arange(4)) and all(neg_image != torch.arange(4))
    assert sum(int(t[0] == 2) for t, _ in draws) >= 45 and sum(int(i[1] == 3) for _, i in draws) >= 45
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 2] = True  # e.g. a duplicate caption
    assert all(int(hard_negatives(sim, positives, g)[0][0]) != 2 for _ in range(20))
    with pytest.raises(ValueError, match="not positive"):
        hard_negatives(torch.zeros(1, 1))


def test_fresh_model_shapes_and_dtype():
    cfg = QFormerConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, n_queries=3, encoder_dim=16,
                        vocab_size=50, max_positions=8, proj_dim=None, itm_head=False)
    model = QFormer(cfg).to(torch.bfloat16).eval()
    out = model(torch.randn(2, 9, 16))  # float32 features into a bfloat16 Q-Former
    assert out.shape == (2, 3, 32) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="more than the 8 positions"):
        model.encode_text(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="not a multiple"):
        QFormer(QFormerConfig(dim=30, n_heads=4))
