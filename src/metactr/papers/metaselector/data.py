"""The MetaSelector protocol's splits of a prepared dataset (``SelectorData``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metactr.data.prepared import PreparedDataset, Split
from metactr.data.split import MS_NEWUSER_SPLITS, MS_SPLITS
from metactr.data.tasks import UserIndex
from metactr.errors import ConfigError, DataError

SUPPORT, QUERY, TEST = MS_SPLITS
NEW_TRAIN, NEW_TEST = MS_NEWUSER_SPLITS


# --------------------------------------------------------------------------- data
def concat_splits(a: Split, b: Split, name: str) -> Split:
    ts = None if a.timestamp is None or b.timestamp is None else torch.cat([a.timestamp, b.timestamp])
    return Split(name, torch.cat([a.user_id, b.user_id]), torch.cat([a.hist_ids, b.hist_ids]),
                 torch.cat([a.hist_len, b.hist_len]), torch.cat([a.hist_labels, b.hist_labels]),
                 torch.cat([a.target, b.target]), torch.cat([a.label, b.label]),
                 torch.cat([a.context, b.context]), ts)


@dataclass
class SelectorData:
    """The MetaSelector protocol's splits of one prepared dataset.

    ``train`` = support + query (the user's first 80%, chronological); ``test`` = the last 20%.
    Meta-test users are the same users (their later data) unless the dataset has the optional
    disjoint ``ms_newuser_train`` / ``ms_newuser_test`` splits.
    """

    ds: PreparedDataset
    support: Split
    query: Split
    train: Split
    test: Split
    test_train: Split  # what meta-test users adapt on
    disjoint_test_users: bool

    @classmethod
    def load(cls, root, *, disjoint: bool | None = None, max_users: int | None = None) -> SelectorData:
        data = cls._load(root, disjoint=disjoint)
        return data.keep_users(max_users) if max_users else data

    def keep_users(self, n: int) -> SelectorData:
        """Only the first ``n`` training users (and the first ``n`` meta-test users)."""
        def first(split: Split, k: int) -> Tensor:
            return torch.unique(split.user_id)[:k]

        def only(split: Split, users: Tensor) -> Split:
            return split.subset(torch.nonzero(torch.isin(split.user_id, users)).flatten())

        tr = first(self.train, n)
        te = tr if not self.disjoint_test_users else first(self.test_train, n)
        train = only(self.train, tr)
        return SelectorData(self.ds, only(self.support, tr), only(self.query, tr), train, only(self.test, te),
                            train if not self.disjoint_test_users else only(self.test_train, te),
                            self.disjoint_test_users)

    def validation(self, support_fraction: float | None = None) -> SelectorData:
        """The validation protocol, for choosing settings without reading a test row.

        Each user's support rows play their training rows and their query rows play the test
        rows; for meta-training, the support rows are cut again, chronologically, into the first
        ``support_fraction`` (support, at least one row; None = the pipeline's default) and the
        rest (query), as the pipeline cuts the training rows. Meta-test users are the training
        users (disjoint ones are unread).
        """
        from metactr.data.split import leading_count

        if support_fraction is None:
            from metactr.data.pipeline import MetaSelectorConfig

            support_fraction = MetaSelectorConfig().support_fraction
        if not 0.0 < support_fraction < 1.0:
            raise ConfigError(f"support_fraction must be in (0, 1), got {support_fraction}",
                              field="support_fraction")
        sup, qry = self.support, self.query
        for s in (sup, qry):
            if len(s) == 0:
                raise DataError(f"split '{s.name}' is empty: no validation protocol without it")
        idx = UserIndex.build(sup)
        first = torch.repeat_interleave(idx.starts, idx.counts)  # group start of each grouped row
        rank = torch.arange(len(idx.rows)) - first  # chronological rank within the user's rows
        n_sup = torch.from_numpy(leading_count(idx.counts.numpy(), support_fraction))  # the pipeline's rule
        in_sup = rank < torch.repeat_interleave(n_sup, idx.counts)
        inner_sup = sup.subset(torch.sort(idx.rows[in_sup]).values)
        inner_qry = sup.subset(torch.sort(idx.rows[~in_sup]).values)
        return SelectorData(self.ds, inner_sup, inner_qry, sup, qry, sup, False)

    @classmethod
    def _load(cls, root, *, disjoint: bool | None = None) -> SelectorData:
        ds = PreparedDataset(root)
        have = set(ds.split_names)
        missing = [s for s in (SUPPORT, QUERY, TEST) if s not in have]
        if missing:
            raise DataError(f"not a MetaSelector split: missing {', '.join(missing)} "
                            "(prepare with protocol 'metaselector')", path=root)
        support, query = ds.split(SUPPORT), ds.split(QUERY)
        train = concat_splits(support, query, "ms_train")
        has_new = NEW_TRAIN in have and NEW_TEST in have
        use_new = has_new if disjoint is None else disjoint
        if use_new and not has_new:
            raise DataError("disjoint meta-test users asked for, but the dataset has no "
                            f"{NEW_TRAIN}/{NEW_TEST} splits", path=root)
        if use_new:
            return cls(ds, support, query, train, ds.split(NEW_TEST), ds.split(NEW_TRAIN), True)
        for s in (support, query, ds.split(TEST)):
            if len(s) == 0:
                raise DataError(f"split '{s.name}' is empty", path=root)
        return cls(ds, support, query, train, ds.split(TEST), train, False)


